"""`surgery inspect`: what a model is and what each token costs it in KV bytes."""

import click

from surgery.cli.errors import friendly_errors
from surgery.cli.options import ALLOW_PICKLE


@click.command()
@click.argument("model")
@ALLOW_PICKLE
@friendly_errors
def inspect(model: str, allow_pickle: bool):
    """Show the family, layers, heads and KV bytes per token of MODEL."""
    from surgery.checkpoint.inspection import describe

    for key, value in describe(model, allow_pickle).items():
        click.echo(f"{key:28s} {value}")
