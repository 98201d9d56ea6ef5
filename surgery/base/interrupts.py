"""Ctrl-C and SIGTERM as exceptions, raised only where unwinding is safe.

Python raises KeyboardInterrupt at the next bytecode, which may be inside an import of a compiled extension
(torch, triton). The half-initialized extension then aborts the interpreter when it is imported again (pybind:
"GradBucket already defined"; nanobind in triton). So a signal that arrives while any module is importing is
recorded and raised once the imports are done, on a short SIGALRM retry. Some libraries swallow interrupts in
broad `except` clauses; `raise_if_received` is called before anything is published, so a swallowed Ctrl-C
still publishes nothing.
"""

import contextlib
import signal
import sys
from collections.abc import Iterator

RETRY_S = 0.02
HANDLED = (signal.SIGINT, signal.SIGTERM)

received: list[int] = []  # signals seen during this command: an import they broke may surface as another error
_depth = 0  # nested blocks (the entry point's, then the command group's) share one record of signals


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout): unwinds like Ctrl-C, so staging folders are removed and --out stays as it was."""


def importing() -> bool:
    """Whether a module's code is running under import right now (importlib marks its spec while it does)."""
    return any(getattr(getattr(module, "__spec__", None), "_initializing", False)
               for module in list(sys.modules.values()))


def _exception() -> KeyboardInterrupt:
    return Terminated() if signal.SIGTERM in received else KeyboardInterrupt()


def _silent(unraisable) -> None:
    """After a signal, objects its exception cut short (a half-built tqdm bar) fail in __del__: not news."""


def _on_signal(signum: int, frame) -> None:
    received.append(signum)
    sys.unraisablehook = _silent
    if importing():
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    raise _exception()


def _on_retry(signum: int, frame) -> None:
    if importing():
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
        return
    raise _exception()


@contextlib.contextmanager
def raised_at_safe_points() -> Iterator[None]:
    """Within the block, SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, never inside an import."""
    global _depth
    _depth += 1
    previous = {signum: signal.signal(signum, _on_signal) for signum in HANDLED}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, _on_retry)
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            received.clear()  # outside every block, nothing is pending
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_if_received() -> None:
    """Called before publishing: a signal whose exception a library swallowed still stops the command here."""
    if received:
        raise _exception()
