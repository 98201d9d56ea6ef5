"""`python -m surgery` runs the CLI, for environments where the console script is not on PATH."""

from .entry import run

run()
