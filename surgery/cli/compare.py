"""`surgery compare`: several checkpoints measured on the same tokens, a table and Pareto plots."""

from pathlib import Path

import click

from surgery.base.errors import SurgeryError
from surgery.cli.errors import friendly_errors
from surgery.cli.options import ALLOW_PICKLE, parse_lengths, quality_options, require_extra, retrieval_options
from surgery.evals.retrieval import TASKS as DEFAULT_RETRIEVAL_TASKS

@click.command("compare")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--baseline", required=True, help="The model every checkpoint is compared with (e.g. their source).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for compare.md, compare.json and the PNG plots.")
@click.option("--overwrite", is_flag=True, help="Replace --out when it exists.")
@retrieval_options("Options", "niah_single_number,niah_multikey", "1024,2048", "Retrieval prompt lengths in tokens.")
@quality_options()
@click.option("--data", default=None, help="Perplexity text (default: python-reference, offline).")
@click.option("--title", default="", help="Heading of compare.md.")
@ALLOW_PICKLE
@click.pass_context
@friendly_errors
def compare_command(ctx, checkpoints, baseline, out, overwrite, tasks, lengths, samples, seed, prompt_format,
                    segments, prompt_len, data, title, allow_pickle):
    """Measure CHECKPOINTS on the same tokens: a table and Pareto plots of KV bytes per token against held-out
    perplexity and retrieval recall."""
    require_extra("matplotlib", "plots", "compare draws its plots with it")
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in DEFAULT_RETRIEVAL_TASKS]
    if not names or unknown:
        raise SurgeryError(f"--tasks {tasks!r}: unknown retrieval task {(unknown or [''])[0]!r}",
                           hint=f"choose from {', '.join(DEFAULT_RETRIEVAL_TASKS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SurgeryError(f"--out {out} exists", hint="pass --overwrite or choose another folder")
    from surgery.evals.compare import ComparePlan, compare, write_report
    from surgery.evals.evaluate import EvalSettings

    plan = ComparePlan(quality=EvalSettings(segments=segments, prompt_len=prompt_len), tasks=tuple(names),
                       lengths=tuple(parse_lengths(lengths)), samples=samples, seed=seed, prompt_format=prompt_format)
    points = compare(list(checkpoints), baseline, plan, data, allow_pickle, ctx.obj["progress"])
    write_report(points, plan, out, overwrite, title)
    click.echo(f"wrote {out / 'compare.md'}, {out / 'kv_vs_perplexity.png'} and {out / 'kv_vs_retrieval.png'}")
