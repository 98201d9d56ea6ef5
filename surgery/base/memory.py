"""How much memory this machine can still give: the bound that conversion, verify and eval plan against."""

from pathlib import Path


def available_memory() -> int:
    """Bytes the kernel says a new allocation can still get (MemAvailable), or 0 when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
