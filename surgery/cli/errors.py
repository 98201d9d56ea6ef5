"""How every command fails: one line naming the problem and the fix on stderr, the usual exit code, never a
traceback (unless -v asks for it)."""

import errno
import functools
import signal
import sys
import traceback
import typing

import click

from surgery.base.disk import out_of_space
from surgery.base.errors import SurgeryError, first_line
from surgery.base.interrupts import Terminated, raise_if_received, raised_at_safe_points, received

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


def _interrupted_exit() -> None:
    """After a signal, any failure is the signal's (e.g. torch half-imported when Ctrl-C hit its import)."""
    if signal.SIGTERM in received:
        fail("terminated: nothing was written to the output", EXIT_TERMINATED)
    if received:
        fail("interrupted: nothing was written to the output", EXIT_INTERRUPTED)
    return None


def fail(message: str, code: int = EXIT_ERROR) -> typing.NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def os_error_line(error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    if out_of_space(error):  # ENOSPC, or a library's short write
        return f"no space left on the device{where}; nothing was written to the output (free some space and run again)"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {error.strerror} (choose a writable location)"
    return f"{error.strerror or error}{where}"


def friendly_errors(command):
    """Turn every failure into one line on stderr and a non-zero exit: SurgeryError with its hint, Ctrl-C and
    SIGTERM, OS errors, and anything unexpected (the traceback only under -v)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SurgeryError as error:
            fail(str(error))
        except Terminated:
            fail("terminated: nothing was written to the output", EXIT_TERMINATED)
        except KeyboardInterrupt:
            fail("interrupted: nothing was written to the output", EXIT_INTERRUPTED)
        except click.ClickException:
            raise
        except OSError as error:
            _interrupted_exit()
            _show_traceback_if_verbose()
            fail(os_error_line(error))
        except Exception as error:  # the last resort: one line, never a traceback unless asked for
            _interrupted_exit()
            _show_traceback_if_verbose()
            fail(f"unexpected {type(error).__name__}: {first_line(error)} (run with -v for the traceback)")

    return wrapper


def _show_traceback_if_verbose() -> None:
    context = click.get_current_context(silent=True)
    if context is not None and context.find_root().params.get("verbose"):
        traceback.print_exc()


class SurgeryGroup(click.Group):
    """The command group: SIGTERM unwinds like Ctrl-C, and usage errors are one line, not click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            with raised_at_safe_points():
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                raise_if_received()  # a library swallowed the interrupt: the exit code still tells
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else "surgery"
            fail(f"{error.format_message()} (see `{command} --help`)", EXIT_USAGE)
        except click.ClickException as error:
            fail(error.format_message(), error.exit_code)
        except Terminated:
            fail("terminated", EXIT_TERMINATED)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", EXIT_INTERRUPTED)
        sys.exit(result if isinstance(result, int) else 0)
