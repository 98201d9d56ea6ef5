"""The console entry point. It imports the CLI under a guard: Ctrl-C or SIGTERM while torch and transformers
load (a few seconds) exits with one line and the usual code, never a traceback."""

import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def run() -> None:
    received: list[int] = []

    def stop(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, stop) for signum in EXIT_CODES}
    try:
        from .cli import main
    except BaseException:
        # transformers' lazy imports re-raise an interrupt as an import error, so ask the handler what happened
        if received:
            sys.stderr.write("error: interrupted while starting\n")
            sys.exit(EXIT_CODES[received[0]])
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    main(prog_name="surgery")
