"""`surgery recipes`: every registered recipe, its paper and what it saves."""

import click

from surgery.recipes import RECIPES


@click.command("recipes")
def recipes_command():
    """List the recipes, their papers and what each saves."""
    for name, recipe in RECIPES.items():
        click.secho(name, bold=True)
        click.echo(f"  paper: {recipe.paper}")
        click.echo(f"  saves: {recipe.saves}")
