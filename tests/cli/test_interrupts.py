"""Signals become exceptions only outside imports, so a compiled extension is never left half-initialized."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from surgery.base import interrupts

SLOW_MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.{signal})
time.sleep(0.3)  # a KeyboardInterrupt raised here would cut the import short
finished = True
"""

SCRIPT = """
import sys
sys.path.insert(0, {folder!r})
from surgery.base import interrupts
try:
    with interrupts.raised_at_safe_points():
        import slow_module
        while True:
            pass
except KeyboardInterrupt as error:
    print(type(error).__name__, sys.modules["slow_module"].finished)
"""


@pytest.mark.parametrize("signum, exception", [("SIGINT", "KeyboardInterrupt"), ("SIGTERM", "Terminated")])
def test_a_signal_during_an_import_is_raised_after_it(tmp_path, signum, exception):
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE.format(signal=signum))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(folder=str(tmp_path))], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [exception, "True"]


def test_a_swallowed_signal_still_stops_publishing():
    before = signal.getsignal(signal.SIGINT)  # not always the default: a background job starts with SIGINT ignored
    with interrupts.raised_at_safe_points():
        interrupts.raise_if_received()  # nothing received: no exception
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**7):  # the handler raises at the next bytecode
                pass
        except KeyboardInterrupt:
            pass  # a library's broad except clause
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_received()
    assert signal.getsignal(signal.SIGINT) is before  # the block puts back the handler it found
    interrupts.raise_if_received()  # the record ends with the block: later work in this process is not stopped
