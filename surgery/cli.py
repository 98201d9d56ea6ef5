"""The `surgery` command line. Bad input prints one line naming the problem and the fix, and exits non-zero."""

import errno
import functools
import logging
import os
import re
import shlex
import signal
import sys
import traceback
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import click

from .errors import SurgeryError, first_line
from .ranges import click_range, has_range
from .recipes import RECIPES, recipe_class

log = logging.getLogger("surgery")

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout): unwinds like Ctrl-C, so staging folders are removed and --out stays as it was."""


def _raise_terminated(signum, frame):
    raise Terminated()


def fail(message: str, code: int = EXIT_ERROR) -> typing.NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def os_error_line(error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{where}; nothing was written to the output (free some space and run again)"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {error.strerror} (choose a writable location)"
    return f"{error.strerror or error}{where}"


def friendly_errors(command):
    """Turn every failure into one line on stderr and a non-zero exit: SurgeryError with its hint, Ctrl-C and
    SIGTERM, OS errors, and anything unexpected (the traceback only under -v)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SurgeryError as error:
            fail(str(error))
        except Terminated:
            fail("terminated: nothing was written to the output", EXIT_TERMINATED)
        except KeyboardInterrupt:
            fail("interrupted: nothing was written to the output", EXIT_INTERRUPTED)
        except click.ClickException:
            raise
        except OSError as error:
            _show_traceback_if_verbose()
            fail(os_error_line(error))
        except Exception as error:  # the last resort: one line, never a traceback unless asked for
            _show_traceback_if_verbose()
            fail(f"unexpected {type(error).__name__}: {first_line(error)} (run with -v for the traceback)")

    return wrapper


def _show_traceback_if_verbose() -> None:
    context = click.get_current_context(silent=True)
    if context is not None and context.find_root().params.get("verbose"):
        traceback.print_exc()


class SurgeryGroup(click.Group):
    """The command group: SIGTERM unwinds like Ctrl-C, and usage errors are one line, not click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else "surgery"
            fail(f"{error.format_message()} (see `{command} --help`)", EXIT_USAGE)
        except click.ClickException as error:
            fail(error.format_message(), error.exit_code)
        except Terminated:
            fail("terminated", EXIT_TERMINATED)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", EXIT_INTERRUPTED)
        finally:
            signal.signal(signal.SIGTERM, previous)
        sys.exit(result if isinstance(result, int) else 0)


def parse_size(text: str) -> int:
    """Bytes, optionally with a K/M/G/T suffix (powers of 1024): 500000000, 2G, 512MB."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise SurgeryError(f"cannot read size {text!r}", hint="give bytes, e.g. 2000000000 or 2G")
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")


def _click_type(annotation):
    """The click type for a recipe field annotation such as `int | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if isinstance(annotation, types.UnionType) else [annotation]
    return {int: int, float: float, str: str, bool: bool}.get(args[0], str)


def dataclass_options(specs, command):
    """Add dataclass fields as options (help from field metadata). Defaults stay None: the dataclass keeps its own."""
    for spec in reversed(specs):
        flag = f"--{spec.name.replace('_', '-')}"
        help_text = spec.metadata.get("help", "")
        if spec.metadata.get("flag"):
            command = click.option(flag, spec.name, is_flag=True, default=None, help=help_text)(command)
            continue
        default = None if spec.default is MISSING else spec.default
        help_text += f" [{default}]" if default is not None else ""
        choices = spec.metadata.get("choices")
        kind = click.Choice(choices) if choices else _click_type(spec.type)
        if has_range(spec) and kind in (int, float):
            kind = click_range(spec, kind)
        command = click.option(flag, spec.name, type=kind, default=None, help=help_text)(command)
    return command


def recipe_options(command):
    """Every recipe's options, each once."""
    specs = {}
    for recipe in RECIPES.values():
        for spec in fields(recipe):
            specs.setdefault(spec.name, spec)
    return dataclass_options(list(specs.values()), command)


def adapt_options(command):
    from .adapt import AdaptSettings

    return dataclass_options([spec for spec in fields(AdaptSettings) if spec.name not in ("teacher", "seed")], command)


def build_recipes(names: str, options: dict) -> list:
    recipes = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        cls = recipe_class(name)
        own = {spec.name for spec in fields(cls)}
        recipes.append(cls(**{k: v for k, v in options.items() if k in own and v is not None}))
    if not recipes:
        raise SurgeryError("no recipe given", hint=f"choose from {', '.join(RECIPES)}")
    foreign = [k for k, v in options.items() if v is not None and all(k not in {s.name for s in fields(r)} for r in recipes)]
    if foreign:
        raise SurgeryError(f"--{foreign[0].replace('_', '-')} does not apply to recipe {names}", hint="remove it")
    return recipes


@click.group(cls=SurgeryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or info logs.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs.")
@click.version_option(package_name="surgery")
@click.pass_context
def main(ctx, quiet: bool, verbose: bool):
    """Convert Hugging Face LLMs into compressed architectures (KV sharing, and more)."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    ctx.obj = {"progress": not quiet}


@main.command("recipes")
def recipes_command():
    """List the recipes, their papers and what each saves."""
    for name, recipe in RECIPES.items():
        click.secho(name, bold=True)
        click.echo(f"  paper: {recipe.paper}")
        click.echo(f"  saves: {recipe.saves}")


@main.command()
@click.argument("model")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled .bin weights.")
@friendly_errors
def inspect(model: str, allow_pickle: bool):
    """Show the family, layers, heads and KV bytes per token of MODEL."""
    from .inspection import describe

    for key, value in describe(model, allow_pickle).items():
        click.echo(f"{key:28s} {value}")


@main.command()
@click.argument("model")
@click.option("--recipe", "recipe_names", default="kvsharer", show_default=True, help="Recipe(s), comma-separated.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--calib", default=None, help="Calibration data: .txt/.jsonl/.parquet, a dataset folder or a Hub dataset name. Default: text the model generates itself (offline).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Calibration samples (default: the recipe's paper setting).")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Tokens per calibration sample (default: the recipe's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Weight dtype (default: the source's).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where layer-by-layer calibration runs (auto: CUDA when visible).")
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="Dtype of layer-by-layer calibration: auto is bfloat16 on CUDA, float32 on CPU (statistics accumulate in float32/float64).")
@click.option("--max-shard-size", default="5G", show_default=True, help="Largest shard, in bytes (K/M/G suffixes allowed).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new checkpoint is complete).")
@click.option("--no-verify", is_flag=True, help="Skip loading the result in a fresh interpreter.")
@click.option("--eval", "run_eval", is_flag=True, help="Run `surgery eval` against the source and put the numbers in the card.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled .bin weights.")
@click.option("--trust-remote-code", is_flag=True, help="Allow running the source tokenizer's own code (it is re-saved as a standard tokenizer).")
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--adapt-steps", type=click.IntRange(min=1), default=None, help="Then train with `surgery adapt` for this many steps, MODEL as teacher.")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID", help="Then verify and upload the result to this Hub repo.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@recipe_options
@click.pass_context
@friendly_errors
def convert(ctx, model, recipe_names, out, calib, num_samples, seq_len, seed, dtype, device, compute_dtype,
            max_shard_size, overwrite,
            no_verify, run_eval, allow_pickle, trust_remote_code, revision, adapt_steps, push_to_hub, private,
            **recipe_kwargs):
    """Convert MODEL (Hub id, folder, .gguf, or `demo`) with a recipe into --out."""
    from .convert import ConvertRequest
    from .convert import convert as run_convert
    from .outputs import check_output

    if push_to_hub:
        from .hub import check_repo_id

        check_repo_id(push_to_hub)
    request = ConvertRequest(
        model=model, recipes=build_recipes(recipe_names, recipe_kwargs), out=out, calib=calib,
        num_samples=num_samples, seq_len=seq_len, seed=seed, dtype=dtype, device=device, compute_dtype=compute_dtype,
        max_shard_size=parse_size(max_shard_size),
        overwrite=overwrite, verify=not no_verify, evaluate=run_eval, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, revision=revision, progress=ctx.obj["progress"],
        command=shlex.join(["surgery", *sys.argv[1:]]),
    )
    if adapt_steps:
        from .adapt import AdaptSettings, adapt

        check_output(out, [Path(model)] if Path(model).exists() else [])
        if out.exists() and not overwrite:
            raise SurgeryError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
        request.out = out.parent / f".{out.name}.converted"
        request.overwrite, request.evaluate = True, False
        try:
            converted = run_convert(request)
            adapt(converted, out, AdaptSettings(teacher=model, steps=adapt_steps, seed=seed), overwrite=overwrite,
                  verify=not no_verify, progress=ctx.obj["progress"], allow_pickle=allow_pickle)
        finally:
            import shutil

            shutil.rmtree(request.out, ignore_errors=True)
    else:
        run_convert(request)
    click.echo(f"wrote {out}")
    if push_to_hub:
        from .hub import push as push_folder

        result = push_folder(out, push_to_hub, private=private, verify=not no_verify)
        click.echo(f"pushed {out} to {result.url}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default=None, help="Branch to push to (created if needed).")
@click.option("--commit-message", default=None)
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the login cache).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded, with sizes, and upload nothing.")
@click.option("--no-verify", is_flag=True, help="Skip loading the checkpoint in a fresh interpreter first.")
@click.option("--trust-remote-code", is_flag=True, help="Verify even if FOLDER's Python files differ from this surgery's.")
@friendly_errors
def push(folder, repo_id, private, revision, commit_message, token, dry_run, no_verify, trust_remote_code):
    """Verify FOLDER and upload it to the Hub as REPO_ID, with its model card."""
    from .hub import push as push_folder

    result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                         token=token, dry_run=dry_run, verify=not no_verify, trust_remote_code=trust_remote_code)
    if dry_run:
        for name, size in result.files:
            click.echo(f"{size:>14,}  {name}")
        click.echo(f"{sum(size for _, size in result.files):>14,}  bytes in {len(result.files)} files (dry run: nothing uploaded)")
    else:
        click.echo(f"pushed {folder} to {result.url}")


@main.command("adapt")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--teacher", required=True, help="The frozen teacher (usually the source model): any MODEL convert accepts.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the saved training state of this --out (never replaces an existing --out).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--no-verify", is_flag=True, help="Skip loading the result in a fresh interpreter.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading a teacher with pickled .bin weights.")
@adapt_options
@click.pass_context
@friendly_errors
def adapt_command(ctx, checkpoint, teacher, out, seed, resume, overwrite, no_verify, allow_pickle, **options):
    """Distil TEACHER into the trainable parts of CHECKPOINT (runs under `accelerate launch` and torchrun too)."""
    from .adapt import AdaptSettings, adapt

    settings = AdaptSettings(teacher=teacher, seed=seed, **{k: v for k, v in options.items() if v is not None})
    adapt(checkpoint, out, settings, resume=resume, overwrite=overwrite, verify=not no_verify,
          progress=ctx.obj["progress"], allow_pickle=allow_pickle)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per launch, not per process
        click.echo(f"wrote {out}")


def parse_lengths(text: str) -> list[int]:
    """`--lengths 1024,2048`: positive token counts."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise SurgeryError(f"--lengths {text!r} is not a list of positive token counts", hint="e.g. --lengths 1024,2048")
    return [int(part) for part in parts]


def check_json_target(path: Path | None) -> None:
    """Fail before a long eval, not after it, when --json cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise SurgeryError(f"--json {path} is a folder", hint="pass a file path, e.g. --json results.json")
    if not path.parent.is_dir():
        raise SurgeryError(f"--json {path}: the folder {path.parent} does not exist", hint="create it first")


@main.command("eval")
@click.argument("checkpoint")
@click.option("--baseline", default=None, help="Model to compare with (any MODEL that convert accepts).")
@click.option("--data", default=None, help="Held-out text (file, folder or dataset). Default: Python's reference manual prose, offline.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=4096, show_default=True, help="Tokens of held-out text to score.")
@click.option("--context", "speed_context", type=click.IntRange(min=2), default=512, show_default=True, help="Context length for the speed test.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Where to write the JSON (default: CHECKPOINT/eval_results.json).")
@click.option("--task", type=click.Choice(["quality", "passkey"]), default="quality", show_default=True, help="quality: perplexity, KV bytes, agreement, speed; passkey: retrieval under a KV budget.")
@click.option("--lengths", default="1024,2048", show_default=True, help="passkey: prompt lengths in tokens.")
@click.option("--budget", type=click.FloatRange(min=0, max=1, min_open=True), default=None, help="passkey: KV budget (default: the checkpoint's; 1 = full cache).")
@click.option("--protocol", type=click.Choice(["query-aware", "context-only", "both"]), default="both", show_default=True)
@click.option("--probe", is_flag=True, help="passkey, context-only: score the context with a generic question.")
@click.option("--per-depth", type=click.IntRange(min=1), default=5, show_default=True, help="passkey: prompts per depth (depths 10%, 50%, 90%).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled .bin weights (CHECKPOINT or --baseline).")
@click.option("--max-memory", default=None, help="Keep at most this much of the weights in memory (e.g. 4G); the rest is offloaded to disk and read layer by layer.")
@click.pass_context
@friendly_errors
def eval_command(ctx, checkpoint, baseline, data, max_tokens, speed_context, json_path, task, lengths, budget,
                 protocol, probe, per_depth, allow_pickle, max_memory):
    """Measure CHECKPOINT: perplexity, KV bytes per token, greedy agreement, speed, memory; or pass-key retrieval."""
    from .card import EVAL_FILE, render_card
    from .evaluate import evaluate, print_report, write_results

    check_json_target(json_path)
    max_memory = None if max_memory is None else parse_size(max_memory)
    if task == "passkey":
        import json

        from .calibration import heldout_text, read_text
        from .loading import load_model
        from .passkey import passkey_report

        sizes = parse_lengths(lengths)
        model, tokenizer = load_model(checkpoint, allow_pickle=allow_pickle, max_memory=max_memory)
        if tokenizer is None:
            raise SurgeryError(f"{checkpoint} has no tokenizer", hint="add its tokenizer files")
        protocols = ["query-aware", "context-only"] if protocol == "both" else [protocol]
        haystack = read_text(data) if data else heldout_text()
        report = passkey_report(model, tokenizer, haystack, sizes, budget, protocols, probe, per_depth,
                                progress=ctx.obj["progress"])
        for name, rows in report["results"].items():
            click.echo(f"pass key, {name}: " + ", ".join(f"{k} tokens {v}" for k, v in rows.items() if "@" not in k))
        continuation = report["continuation_perplexity"]
        click.echo(f"perplexity of {continuation['scored_tokens']} tokens after a compressed "
                   f"{continuation['prompt_tokens']}-token prompt: {continuation['perplexity']:.3f}")
        if json_path:
            json_path.write_text(json.dumps(report, indent=2) + "\n")
        return

    results = evaluate(checkpoint, baseline, progress=ctx.obj["progress"], allow_pickle=allow_pickle, max_memory=max_memory, data=data,
                       max_tokens=max_tokens, speed_context=speed_context)
    print_report(results)
    folder = Path(checkpoint)
    is_surgery_checkpoint = (folder / "recipe.yaml").is_file()
    target = json_path or (folder / EVAL_FILE if is_surgery_checkpoint else None)
    if target is not None:
        write_results(results, target)
        click.echo(f"wrote {target}")
    if is_surgery_checkpoint and json_path is None:
        render_card(folder)


@main.command()
@click.argument("checkpoint")
@click.option("--prompt", default="Write one sentence about the sea.", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@friendly_errors
def generate(checkpoint, prompt, max_new_tokens):
    """Greedy-generate from CHECKPOINT, using its chat template when it has one."""
    if not prompt.strip():
        raise SurgeryError("--prompt is empty", hint='pass some text, e.g. --prompt "Name three rivers in Europe."')
    import torch

    from .loading import load_model

    model, tokenizer = load_model(checkpoint)
    if tokenizer is None:
        raise SurgeryError(f"{checkpoint} has no tokenizer to read the prompt", hint="add its tokenizer files")
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    click.echo(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))


if __name__ == "__main__":
    main(prog_name="surgery")
