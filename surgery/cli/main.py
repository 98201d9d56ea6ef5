"""The `surgery` command group: one module per command (cli/<command>.py), options they share declared once
(cli/options.py), and every failure one line (cli/errors.py)."""

import logging
import os
import warnings

import click

from surgery.cli.adapt import adapt_command
from surgery.cli.compare import compare_command
from surgery.cli.convert import convert
from surgery.cli.errors import SurgeryGroup
from surgery.cli.eval import eval_command
from surgery.cli.generate import generate
from surgery.cli.inspect import inspect
from surgery.cli.push import push
from surgery.cli.recipes import recipes_command

@click.group(cls=SurgeryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or info logs.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs.")
@click.version_option(package_name="surgery")
@click.pass_context
def main(ctx, quiet: bool, verbose: bool):
    """Convert Hugging Face LLMs into compressed architectures (KV sharing, and more)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    # info logs are surgery's own; other libraries' (torch prints cache stats at exit) only with -v
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("surgery").setLevel(level)
    if not verbose:  # the zero-width shared expert a plain upcycled Qwen2-MoE holds (layouts.family_extras)
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    if quiet:  # read by huggingface_hub and transformers when they are imported, later
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    ctx.obj = {"progress": not quiet}


for command in (recipes_command, inspect, convert, push, adapt_command, eval_command, generate, compare_command):
    main.add_command(command)


if __name__ == "__main__":
    main(prog_name="surgery")
