"""Writing an output folder without losing anything.

- `check_output` refuses an `--out` that is an input, holds an input, lies inside one, or is the current folder,
  and one that cannot be written, before any work starts.
- `exclusive` holds a lock on `--out` for the whole command, so a second writer fails at once.
- `staging` writes into a fresh folder beside `--out` and renames it into place only when everything succeeded.
- `remove_strays` deletes the staging folders of runs that were killed (their process is gone), and says so.
"""

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from surgery.base.disk import full_disk_error, nearest_existing, out_of_space
from surgery.base.errors import SurgeryError
from surgery.base.interrupts import raise_if_received
from surgery.base.sizes import format_size

log = logging.getLogger(__name__)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(out: Path, inputs: list[Path], option: str = "--out") -> Path:
    """Refuse an output that would replace or contain an input, or the current folder, or cannot be written."""
    resolved = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise SurgeryError(f"{option} {out} is the current folder or contains it",
                           hint=f"pass a new folder for {option}, e.g. {option} ./converted")
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if _overlaps(resolved, source):
            raise SurgeryError(f"{option} {out} overlaps the input {given}: writing there would replace it",
                               hint=f"pass a {option} folder outside the input")
    if resolved.exists() and not resolved.is_dir():
        raise SurgeryError(f"{option} {out} exists and is a file", hint=f"pass a folder for {option}")
    existing = nearest_existing(resolved.parent)
    if not existing.is_dir():
        raise SurgeryError(f"{option} {out} lies under {existing}, which is a file", hint=f"pass a folder for {option}")
    try:
        probe = existing / f".surgery-probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        raise SurgeryError(f"cannot write {option} {out}: {existing} is not writable ({error.strerror})",
                           hint=f"pass a {option} on a writable file system") from None
    return resolved


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_strays(parent: Path, prefix: str) -> list[Path]:
    """Delete `<prefix><PID>` folders whose process no longer runs: what a killed run (SIGKILL) left behind."""
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run (process %s is gone)", path, pid)
            removed.append(path)
    return removed


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold a lock beside `out` so two commands never write the same folder at once. Under a distributed launch
    (torchrun, accelerate launch) the processes of one command are one writer: only rank 0 takes the lock."""
    import fcntl

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(handle)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise SurgeryError(f"another surgery command is writing {out}",
                               hint="wait for it to finish, or choose another --out") from None
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(handle)


@contextlib.contextmanager
def staging(out: Path, overwrite: bool, needed: int = 0) -> Iterator[Path]:
    """A fresh folder beside `out` that replaces `out` only if the block finishes without an exception. A write the
    disk refused is named as a full disk (with `needed`, the bytes the output takes, where the caller knows)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"{out} exists and is not a folder", hint="choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.partial-"
    remove_strays(out.parent, prefix)
    remove_strays(out.parent, f".{out.name}.replaced-")
    temp = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        try:
            yield temp
        except Exception as error:
            if not out_of_space(error):
                raise
            written = sum(path.stat().st_size for path in temp.rglob("*") if path.is_file())
            raise full_disk_error(out.parent, needed or None,
                                  hint=f"{format_size(written)} were written before it filled; nothing was kept; free "
                                       "space there, or pass another --out") from None
        raise_if_received()
        if out.exists():
            if not overwrite:
                raise SurgeryError(f"{out} appeared while this command ran; it was left as it is",
                                   hint="pass --overwrite to replace it, or choose another --out")
            backup = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(backup)
            temp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            temp.rename(out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
