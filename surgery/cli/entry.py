"""The console entry point. Ctrl-C or SIGTERM at any time, even while torch and transformers load, exits with
one line and the usual code, never a traceback or an abort."""

import sys

from surgery.base import interrupts


def run() -> None:
    with interrupts.raised_at_safe_points():
        try:
            from surgery.cli.main import main
        except KeyboardInterrupt as error:
            terminated = isinstance(error, interrupts.Terminated)
            sys.stderr.write(f"error: {'terminated' if terminated else 'interrupted'} while starting\n")
            sys.exit(143 if terminated else 130)
        main(prog_name="surgery")
