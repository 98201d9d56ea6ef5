"""`python -m surgery` runs the CLI, for environments where the console script is not on PATH."""

from .cli import main

main(prog_name="surgery")
