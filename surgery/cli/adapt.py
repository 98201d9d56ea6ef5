"""`surgery adapt`: distil a teacher into the parts of a checkpoint its recipes mark trainable."""

import os
from pathlib import Path

import click

from surgery.cli.errors import friendly_errors
from surgery.cli.options import ALLOW_PICKLE, MAX_SHARD_SIZE, NO_VERIFY, OUT, OVERWRITE, SectionedCommand, adapt_options


@click.command("adapt", cls=SectionedCommand)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--teacher", required=True, help="The frozen teacher (usually the source model): any MODEL convert accepts.")
@OUT
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the saved training state of this --out (never replaces an existing --out).")
@OVERWRITE
@NO_VERIFY
@ALLOW_PICKLE
@MAX_SHARD_SIZE
@adapt_options
@click.pass_context
@friendly_errors
def adapt_command(ctx, checkpoint, teacher, out, seed, resume, overwrite, no_verify, allow_pickle, max_shard_size,
                  **options):
    """Distil TEACHER into the trainable parts of CHECKPOINT (runs under `accelerate launch` and torchrun too)."""
    from surgery.adapt.engine import adapt
    from surgery.adapt.settings import AdaptSettings

    settings = AdaptSettings(teacher=teacher, seed=seed, **{k: v for k, v in options.items() if v is not None})
    adapt(checkpoint, out, settings, resume=resume, overwrite=overwrite, verify=not no_verify,
          progress=ctx.obj["progress"], allow_pickle=allow_pickle,
          **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    if int(os.environ.get("RANK", "0")) == 0:  # one line per launch, not per process
        click.echo(f"wrote {out}")
