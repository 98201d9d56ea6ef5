"""Recognising a write that ran out of space, wherever it happened, so the error names the full disk and what is
needed: never a library's bare short-write message, and never a hint to re-download a source that is intact."""

import errno
import re
import shutil
from pathlib import Path

from surgery.base.errors import SurgeryError
from surgery.base.sizes import format_size

# How safetensors (Rust's write_all) and the gguf/numpy writers word a write the disk refused.
NO_SPACE = re.compile(r"\d+ requested and \d+ written|no space left|not enough free space|disk (is )?full", re.I)


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (where a folder about to be made will live)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def out_of_space(error: BaseException | None) -> bool:
    """Whether `error`, or anything in its chain, is ENOSPC or a short write."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if NO_SPACE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def full_disk_error(folder: Path, needed: int | None = None, hint: str = "free space there, or write elsewhere"
                    ) -> SurgeryError:
    """One line naming the folder whose disk is full, how much is free there, and how much the write needed."""
    folder = Path(folder)
    free = shutil.disk_usage(nearest_existing(folder)).free
    need = f", about {format_size(needed)} needed" if needed else ""
    return SurgeryError(f"the disk holding {folder} is full ({format_size(free)} free{need})", hint=hint)
