"""`surgery eval`: quality, pass key, the RULER-style retrieval suite, or lm-evaluation-harness on a checkpoint."""

from pathlib import Path

import click

from surgery.base.errors import SurgeryError
from surgery.base.ranges import FiniteFloat
from surgery.cli.errors import friendly_errors
from surgery.cli.options import (ALLOW_PICKLE, MAX_MEMORY, SectionedCommand, check_json_target, parse_lengths,
                                 quality_options, require_extra, retrieval_options, section_option)
from surgery.evals.retrieval import TASKS as DEFAULT_RETRIEVAL_TASKS

QUALITY, PASSKEY, RETRIEVAL = "quality task options", "passkey and retrieval task options", "retrieval task options"
HARNESS = "lm-evaluation-harness options (pip install 'surgery[lm-eval]')"


@click.command("eval", cls=SectionedCommand)
@click.argument("checkpoint")
@click.option("--task", type=click.Choice(["quality", "passkey", "retrieval"]), default="quality", show_default=True, help="quality: perplexity, KV bytes, agreement, speed; passkey: one pass key; retrieval: the RULER-style suite.")
@click.option("--baseline", default=None, help="Model to compare with on the same prompts (any MODEL that convert accepts).")
@click.option("--keep", type=FiniteFloat(0, 1, low_open=True), default=None, help="Fraction of each prompt an eviction policy keeps (default: the checkpoint's; 1 = full cache).")
@click.option("--data", default=None, help="Text (file, folder, dataset or corpus name). Default: python-reference for quality, stdlib-haystack for passkey, both offline and disjoint from calibration.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Where to write the results (default: CHECKPOINT/eval_results.json, or ./eval_results.json for a Hub id).")
@ALLOW_PICKLE
@MAX_MEMORY
@quality_options(QUALITY)
@section_option("--score-tokens", type=click.IntRange(min=1), default=128, show_default=True, section=QUALITY, help="Tokens scored after each compressed prompt.")
@section_option("--context", "speed_context", type=click.IntRange(min=2), default=512, show_default=True, section=QUALITY, help="Context length of the speed test.")
@section_option("--protocol", type=click.Choice(["query-aware", "context-only", "both"]), default="both", show_default=True, section=PASSKEY, help="query-aware: the question ends the prompt; context-only: the context is compressed before the question is known.")
@section_option("--probe", is_flag=True, section=PASSKEY, help="context-only: score the context with a generic question.")
@section_option("--per-depth", type=click.IntRange(min=1), default=2, show_default=True, section=PASSKEY, help="passkey: prompts per depth (depths 10%, 50%, 90%).")
@retrieval_options(RETRIEVAL, ",".join(DEFAULT_RETRIEVAL_TASKS), None,
                   "Prompt lengths in tokens (pass key too). [passkey: 1024,2048; retrieval: 1024,2048,4096]")
@section_option("--lm-eval", "lm_eval_tasks", default=None, section=HARNESS, help="Run these lm-eval tasks instead (comma-separated, e.g. hellaswag,arc_easy).")
@section_option("--lm-eval-include", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, section=HARNESS, help="A folder of extra lm-eval task YAMLs.")
@section_option("--limit", type=click.IntRange(min=1), default=None, section=HARNESS, help="Documents per task (default: all).")
@section_option("--num-fewshot", type=click.IntRange(min=0), default=None, section=HARNESS, help="Few-shot examples (default: the task's).")
@section_option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, section=HARNESS, help="lm-eval's batch size.")
@click.pass_context
@friendly_errors
def eval_command(ctx, checkpoint, task, baseline, keep, data, json_path, allow_pickle, max_memory, segments,
                 prompt_len, score_tokens, speed_context, protocol, probe, per_depth, tasks, lengths, samples, seed,
                 prompt_format, lm_eval_tasks, lm_eval_include, limit, num_fewshot, batch_size):
    """Measure CHECKPOINT as generate() uses it: perplexity and greedy agreement through compressed prompts, KV
    bytes from the cache, speed, memory; or pass-key retrieval. Results go to eval_results.json."""
    from surgery.checkpoint.card import render_card
    from surgery.checkpoint.records import default_results_path, write_results

    sizes = parse_lengths(lengths if lengths is not None else "1024,2048,4096" if task == "retrieval" else "1024,2048")
    target = json_path or default_results_path(checkpoint)
    check_json_target(target)
    if lm_eval_tasks is not None:
        if ctx.get_parameter_source("task") is not click.core.ParameterSource.DEFAULT:
            raise SurgeryError("--lm-eval runs lm-eval's tasks instead of --task", hint="give one of them")
        names = [name.strip() for name in lm_eval_tasks.split(",") if name.strip()]
        if not names:
            raise SurgeryError("--lm-eval names no task", hint="e.g. --lm-eval hellaswag,arc_easy")
        require_extra("lm_eval", "lm-eval", "--lm-eval runs lm-evaluation-harness")
        from surgery.evals.harness import evaluate_lm_eval, print_lm_eval

        results = evaluate_lm_eval(checkpoint, names, lm_eval_include, keep, limit, num_fewshot, batch_size,
                                   allow_pickle, max_memory)
        print_lm_eval(results)
    elif task == "retrieval":
        from surgery.evals.retrieval_eval import evaluate_retrieval, print_retrieval

        results = evaluate_retrieval(checkpoint, baseline, data, [t.strip() for t in tasks.split(",") if t.strip()],
                                     sizes, samples, keep, protocol, seed, allow_pickle, max_memory,
                                     ctx.obj["progress"], prompt_format)
        print_retrieval(results)
    elif task == "passkey":
        from surgery.evals.passkey import evaluate_passkey, print_passkey

        results = evaluate_passkey(checkpoint, baseline, data, sizes, keep, protocol, probe, per_depth, allow_pickle,
                                   max_memory, ctx.obj["progress"])
        print_passkey(results)
    else:
        from surgery.evals.evaluate import evaluate, print_report

        results = evaluate(checkpoint, baseline, progress=ctx.obj["progress"], allow_pickle=allow_pickle,
                           max_memory=max_memory, data=data, segments=segments, prompt_len=prompt_len,
                           score_tokens=score_tokens, speed_context=speed_context, keep=keep)
        print_report(results)
    write_results(results, target)
    click.echo(f"wrote {target}")
    folder = Path(checkpoint)
    if (folder / "recipe.yaml").is_file() and target == default_results_path(checkpoint):
        render_card(folder)
