"""`python -m surgery` runs the CLI, for environments where the console script is not on PATH."""

from surgery.cli.entry import run

run()
