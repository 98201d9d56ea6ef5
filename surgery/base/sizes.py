"""Byte sizes as users write them (`5G`, `512MB`), and the one default shard size every writer uses."""

import re

from surgery.base.errors import SurgeryError

DEFAULT_SHARD_SIZE = 5 * 1024**3  # 5 GiB, as transformers' save_pretrained


def parse_size(text: str) -> int:
    """Bytes, optionally with a K/M/G/T suffix (powers of 1024): 500000000, 2G, 512MB."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise SurgeryError(f"cannot read size {text!r}", hint="give bytes, e.g. 2000000000 or 2G")
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")


def format_size(count: int) -> str:
    """Bytes as a person reads them: 3.4 MiB, 12.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count:.1f} TiB"
