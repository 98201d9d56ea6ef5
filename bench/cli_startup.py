"""How long the CLI takes to answer when it has nothing heavy to do: help, version, the recipe list.

    python bench/cli_startup.py [--repeats 7]

Each command runs in a fresh `python -m surgery` process; the table gives the median and the slowest wall time.
Writes bench/results/cli_startup.md. The target is under one second for each.
"""

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cli_startup.md"
COMMANDS = [["--help"], ["--version"], ["recipes"], ["convert", "--help"], ["eval", "--help"], ["adapt", "--help"],
            ["generate", "--help"], ["push", "--help"], ["inspect", "--help"]]


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "surgery", *args], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    bare = [wall(["--version"]) for _ in range(2)]  # warm the file cache
    del bare
    python = statistics.median(_python_only() for _ in range(args.repeats))
    lines = ["# CLI start-up time", "",
             f"`python bench/cli_startup.py` on {platform.machine()}, Python {platform.python_version()}: wall time of a "
             f"fresh `python -m surgery ...` process, median and max of {args.repeats} runs. A bare `python -c pass` "
             f"takes {python * 1000:.0f} ms here. Target: under 1 s.", "",
             "| command | median (ms) | max (ms) |", "|---|---|---|"]
    for command in COMMANDS:
        times = [wall(command) for _ in range(args.repeats)]
        lines.append(f"| `surgery {' '.join(command)}` | {statistics.median(times) * 1000:.0f} | {max(times) * 1000:.0f} |")
        print(lines[-1], flush=True)
    RESULTS.write_text("\n".join(lines) + "\n")


def _python_only() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
