"""`surgery convert`: one conversion, optionally followed by `surgery adapt` and `surgery push`."""

import shlex
import sys
from pathlib import Path

import click

from surgery.base.errors import SurgeryError
from surgery.cli.errors import friendly_errors
from surgery.cli.options import (ALLOW_PICKLE, TRUST_REMOTE_CODE, RecipeNames, SectionedCommand, build_recipes,
                                 calibration_options, output_options, recipe_options)

CALIBRATION_SETTINGS = ("calib", "num_samples", "seq_len", "seed", "calib_batch_size", "device", "compute_dtype")


@click.command(cls=SectionedCommand)
@click.argument("model", required=False)
@click.option("--recipe", "recipe_names", type=RecipeNames(), default=None, help="Recipe, or recipes to compose, comma-separated (see `surgery recipes`). [kvsharer]")
@click.option("--recipe-file", type=click.Path(path_type=Path), default=None, help="Replay the conversion a recipe.yaml records (same recipes, options, calibration and dtype); MODEL defaults to its source.")
@output_options
@click.option("--eval", "run_eval", is_flag=True, help="Run `surgery eval` against the source and put the numbers in the card.")
@ALLOW_PICKLE
@TRUST_REMOTE_CODE
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--adapt-steps", type=click.IntRange(min=1), default=None, help="Then train with `surgery adapt` for this many steps, MODEL as teacher.")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID", help="Then verify and upload the result to this Hub repo.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@calibration_options
@recipe_options
@click.pass_context
@friendly_errors
def convert(ctx, model, recipe_names, recipe_file, out, dtype, max_shard_size, overwrite, no_verify, run_eval,
            allow_pickle, trust_remote_code, revision, adapt_steps, push_to_hub, private, **options):
    """Convert MODEL (Hub id, folder, .gguf, or `demo`) with a recipe into --out."""
    from surgery.pipelines.chain import Then, convert_then
    from surgery.pipelines.convert import ConvertRequest

    settings = {name: options.pop(name) for name in CALIBRATION_SETTINGS} | {"dtype": dtype}
    if recipe_file is not None:
        from surgery.pipelines.replay import replayed_request

        given = [name for name, value in {**settings, **options, "recipe": recipe_names}.items() if value is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise SurgeryError(f"{flag} cannot be combined with --recipe-file, which replays every setting",
                               hint=f"drop {flag}, or edit the recipe.yaml")
        request = replayed_request(recipe_file, model)
    else:
        if model is None:
            raise SurgeryError("no MODEL given", hint="pass a Hub id, a folder, a .gguf file or `demo`, or --recipe-file")
        request = ConvertRequest(model=model, recipes=build_recipes(recipe_names or "kvsharer", options), out=out,
                                 **{k: v for k, v in settings.items() if v is not None})
    if max_shard_size is not None:  # else the default, or the size the replayed recipe.yaml records
        request.max_shard_size = max_shard_size
    request.out, request.overwrite, request.verify, request.evaluate = out, overwrite, not no_verify, run_eval
    request.allow_pickle, request.trust_remote_code, request.revision = allow_pickle, trust_remote_code, revision
    request.progress, request.command = ctx.obj["progress"], shlex.join(["surgery", *sys.argv[1:]])
    pushed = convert_then(request, Then(adapt_steps, push_to_hub, private))
    click.echo(f"wrote {out}")
    if pushed is not None:
        click.echo(f"pushed {out} to {pushed.url}")
