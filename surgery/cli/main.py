"""The `surgery` command line. Bad input prints one line naming the problem and the fix, and exits non-zero."""

import shutil
import errno
import functools
import logging
import os
import re
import shlex
import signal
import sys
import traceback
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

import click

from surgery.base.errors import SurgeryError, first_line
from surgery.base.interrupts import Terminated, raise_if_received, raised_at_safe_points, received
from surgery.base.ranges import click_range, has_range, value_type
from surgery.calibrate.corpora import DEFAULT_CALIBRATION, SELF_GENERATED
from surgery.recipes import RECIPES, recipe_class
from surgery.evals.retrieval import DEFAULT_FORMAT, PROMPT_FORMATS
from surgery.evals.retrieval import TASKS as DEFAULT_RETRIEVAL_TASKS

log = logging.getLogger("surgery")

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


def _interrupted_exit() -> None:
    """After a signal, any failure is the signal's (e.g. torch half-imported when Ctrl-C hit its import)."""
    if signal.SIGTERM in received:
        fail("terminated: nothing was written to the output", EXIT_TERMINATED)
    if received:
        fail("interrupted: nothing was written to the output", EXIT_INTERRUPTED)
    return None


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
            _interrupted_exit()
            _show_traceback_if_verbose()
            fail(os_error_line(error))
        except Exception as error:  # the last resort: one line, never a traceback unless asked for
            _interrupted_exit()
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
        try:
            with raised_at_safe_points():
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                raise_if_received()  # a library swallowed the interrupt: the exit code still tells
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx else "surgery"
            fail(f"{error.format_message()} (see `{command} --help`)", EXIT_USAGE)
        except click.ClickException as error:
            fail(error.format_message(), error.exit_code)
        except Terminated:
            fail("terminated", EXIT_TERMINATED)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", EXIT_INTERRUPTED)
        sys.exit(result if isinstance(result, int) else 0)


def parse_size(text: str) -> int:
    """Bytes, optionally with a K/M/G/T suffix (powers of 1024): 500000000, 2G, 512MB."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise SurgeryError(f"cannot read size {text!r}", hint="give bytes, e.g. 2000000000 or 2G")
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")


class SectionedOption(click.Option):
    """An option listed under a heading of `--help` (a recipe's name, or Calibration)."""

    def __init__(self, *args, section: str = "Options", **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


class SectionedCommand(click.Command):
    """`--help` lists options under their sections, in the order they are first declared."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "section", "Options"), []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def section_option(*names, section: str, **kwargs):
    return click.option(*names, cls=SectionedOption, section=section, **kwargs)


def dataclass_options(owner: type, specs, command, section: str = "Options"):
    """Add dataclass fields as options (help from field metadata). Defaults stay None: the dataclass keeps its own."""
    for spec in reversed(specs):
        flag = f"--{spec.name.replace('_', '-')}"
        help_text = spec.metadata.get("help", "")
        if spec.metadata.get("flag"):
            command = section_option(flag, spec.name, is_flag=True, default=None, help=help_text, section=section)(command)
            continue
        default = None if spec.default is MISSING else spec.default
        help_text += f" [{default}]" if default is not None else ""
        choices = spec.metadata.get("choices")
        kind = click.Choice(choices) if choices else value_type(owner, spec)
        if has_range(spec) and kind in (int, float):
            kind = click_range(spec, kind)
        command = section_option(flag, spec.name, type=kind, default=None, help=help_text, section=section)(command)
    return command


def recipe_option_groups() -> list[tuple[str, type, list]]:
    """Each recipe option once, under a heading naming every recipe that takes it (the eviction recipes share
    theirs, with one meaning), in registry order."""
    takers: dict[str, list[str]] = {}
    owners: dict[str, tuple[type, object]] = {}
    for name, recipe in RECIPES.items():
        for spec in fields(recipe):
            takers.setdefault(spec.name, []).append(name)
            owners.setdefault(spec.name, (recipe, spec))
    groups: dict[str, tuple[type, list]] = {}
    for option, names in takers.items():
        title = f"{', '.join(names)} options"
        recipe, spec = owners[option]
        groups.setdefault(title, (recipe, []))[1].append(spec)
    return [(title, recipe, specs) for title, (recipe, specs) in groups.items()]


def recipe_options(command):
    for title, recipe, specs in reversed(recipe_option_groups()):
        command = dataclass_options(recipe, specs, command, section=title)
    return command


def adapt_options(command):
    from surgery.adapt.settings import AdaptSettings

    specs = [spec for spec in fields(AdaptSettings) if spec.name not in ("teacher", "seed")]
    return dataclass_options(AdaptSettings, specs, command, section="Training options")


class RecipeNames(click.ParamType):
    """`--recipe kvsharer` or a composition `kvsharer,snapkv`, each name one of the registry's."""

    name = "recipes"

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(RECIPES) + "][,...]"

    def convert(self, value, param, ctx):
        names = [part.strip() for part in str(value).split(",") if part.strip()]
        unknown = [name for name in names if name not in RECIPES]
        if not names or unknown:
            self.fail(f"unknown recipe {', '.join(map(repr, unknown)) or repr(value)}; choose from {', '.join(RECIPES)}",
                      param, ctx)
        return ",".join(names)


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
    # info logs are surgery's own; other libraries' (torch prints cache stats at exit) only with -v
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("surgery").setLevel(level)
    if not verbose:  # the zero-width shared expert a plain upcycled Qwen2-MoE holds (layouts.family_extras)
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    if quiet:  # read by huggingface_hub and transformers when they are imported, later
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
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
    from surgery.checkpoint.inspection import describe

    for key, value in describe(model, allow_pickle).items():
        click.echo(f"{key:28s} {value}")


CALIBRATION = "Calibration options"


@main.command(cls=SectionedCommand)
@click.argument("model", required=False)
@click.option("--recipe", "recipe_names", type=RecipeNames(), default=None, help="Recipe, or recipes to compose, comma-separated (see `surgery recipes`). [kvsharer]")
@click.option("--recipe-file", type=click.Path(path_type=Path), default=None, help="Replay the conversion a recipe.yaml records (same recipes, options, calibration and dtype); MODEL defaults to its source.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Weight dtype of the checkpoint (default: the source's; a GGUF source is dequantized to float32).")
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
@section_option("--calib", default=None, section=CALIBRATION, help=f"Calibration text: .txt/.jsonl/.parquet, a dataset folder, a Hub dataset name, or `{SELF_GENERATED}` (the source samples its own). [{DEFAULT_CALIBRATION}: stdlib docstrings, offline]")
@section_option("--num-samples", type=click.IntRange(min=1), default=None, section=CALIBRATION, help="Calibration samples (default: the recipe paper's setting).")
@section_option("--seq-len", type=click.IntRange(min=2), default=None, section=CALIBRATION, help="Tokens per calibration sample (default: the recipe's).")
@section_option("--seed", type=int, default=None, section=CALIBRATION, help="Seed of the calibration windows and searches. [0]")
@section_option("--calib-batch-size", type=click.IntRange(min=1), default=None, section=CALIBRATION, help="Calibration samples per batch through each layer. [8]")
@section_option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, section=CALIBRATION, help="Where layer-by-layer calibration runs (auto: CUDA when visible). [auto]")
@section_option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None, section=CALIBRATION, help="Dtype of layer-by-layer calibration: auto is bfloat16 on CUDA, float32 on CPU (statistics accumulate in float32/float64). [auto]")
@recipe_options
@click.pass_context
@friendly_errors
def convert(ctx, model, recipe_names, recipe_file, out, dtype, max_shard_size, overwrite, no_verify, run_eval,
            allow_pickle, trust_remote_code, revision, adapt_steps, push_to_hub, private, calib, num_samples, seq_len,
            seed, calib_batch_size, device, compute_dtype, **recipe_kwargs):
    """Convert MODEL (Hub id, folder, .gguf, or `demo`) with a recipe into --out."""
    from surgery.pipelines.convert import ConvertRequest
    from surgery.pipelines.convert import convert as run_convert
    from surgery.base.outputs import check_output

    if push_to_hub:
        from surgery.checkpoint.hub import check_repo_id

        check_repo_id(push_to_hub)
    settings = dict(calib=calib, num_samples=num_samples, seq_len=seq_len, seed=seed, calib_batch_size=calib_batch_size,
                    device=device, compute_dtype=compute_dtype, dtype=dtype)
    if recipe_file is not None:
        from surgery.pipelines.replay import replayed_request

        given = [name for name, value in {**settings, **recipe_kwargs, "recipe": recipe_names}.items() if value is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise SurgeryError(f"{flag} cannot be combined with --recipe-file, which replays every setting",
                               hint=f"drop {flag}, or edit the recipe.yaml")
        request = replayed_request(recipe_file, model)
    else:
        if model is None:
            raise SurgeryError("no MODEL given", hint="pass a Hub id, a folder, a .gguf file or `demo`, or --recipe-file")
        request = ConvertRequest(model=model, recipes=build_recipes(recipe_names or "kvsharer", recipe_kwargs), out=out,
                                 **{k: v for k, v in settings.items() if v is not None})
    if recipe_file is None or ctx.get_parameter_source("max_shard_size").name != "DEFAULT":  # else the recorded one
        request.max_shard_size = parse_size(max_shard_size)
    request.out = out
    request.overwrite, request.verify, request.evaluate = overwrite, not no_verify, run_eval
    request.allow_pickle, request.trust_remote_code, request.revision = allow_pickle, trust_remote_code, revision
    request.progress, request.command = ctx.obj["progress"], shlex.join(["surgery", *sys.argv[1:]])
    model = request.model
    if adapt_steps:
        from surgery.adapt.engine import adapt
        from surgery.adapt.settings import AdaptSettings

        check_output(out, [Path(model)] if Path(model).exists() else [])
        if out.exists() and not overwrite:
            raise SurgeryError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
        request.out = out.parent / f".{out.name}.converted"
        request.overwrite, request.evaluate = True, False
        try:
            converted = run_convert(request)
            adapt(converted, out, AdaptSettings(teacher=model, steps=adapt_steps, seed=request.seed), overwrite=overwrite,
                  verify=not no_verify, progress=ctx.obj["progress"], allow_pickle=allow_pickle)
        finally:
            shutil.rmtree(request.out, ignore_errors=True)
    else:
        run_convert(request)
    click.echo(f"wrote {out}")
    if push_to_hub:
        from surgery.checkpoint.hub import push as push_folder

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
    from surgery.checkpoint.hub import push as push_folder

    result = push_folder(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                         token=token, dry_run=dry_run, verify=not no_verify, trust_remote_code=trust_remote_code)
    if dry_run:
        for name, size in result.files:
            click.echo(f"{size:>14,}  {name}")
        click.echo(f"{sum(size for _, size in result.files):>14,}  bytes in {len(result.files)} files (dry run: nothing uploaded)")
    else:
        click.echo(f"pushed {folder} to {result.url}")


@main.command("adapt", cls=SectionedCommand)
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
    from surgery.adapt.engine import adapt
    from surgery.adapt.settings import AdaptSettings

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


def require_extra(module: str, extra: str, purpose: str) -> None:
    """An optional dependency missing: one line naming the extra to install, before any work."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SurgeryError(f"{module} is not installed; {purpose}", hint=f"pip install 'surgery[{extra}]'")


def check_json_target(path: Path | None) -> None:
    """Fail before a long eval, not after it, when --json cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise SurgeryError(f"--json {path} is a folder", hint="pass a file path, e.g. --json results.json")
    if not path.parent.is_dir():
        raise SurgeryError(f"--json {path}: the folder {path.parent} does not exist", hint="create it first")


QUALITY, PASSKEY, RETRIEVAL = "quality task options", "passkey and retrieval task options", "retrieval task options"
HARNESS = "lm-evaluation-harness options (pip install 'surgery[lm-eval]')"


@main.command("eval", cls=SectionedCommand)
@click.argument("checkpoint")
@click.option("--task", type=click.Choice(["quality", "passkey", "retrieval"]), default="quality", show_default=True, help="quality: perplexity, KV bytes, agreement, speed; passkey: one pass key; retrieval: the RULER-style suite.")
@click.option("--baseline", default=None, help="Model to compare with on the same prompts (any MODEL that convert accepts).")
@click.option("--keep", type=click.FloatRange(min=0, max=1, min_open=True), default=None, help="Fraction of each prompt an eviction policy keeps (default: the checkpoint's; 1 = full cache).")
@click.option("--data", default=None, help="Text (file, folder, dataset or corpus name). Default: python-reference for quality, stdlib-haystack for passkey, both offline and disjoint from calibration.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Where to write the results (default: CHECKPOINT/eval_results.json, or ./eval_results.json for a Hub id).")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled .bin weights (CHECKPOINT or --baseline).")
@click.option("--max-memory", default=None, help="Keep at most this much of the weights in memory (e.g. 4G); the rest is offloaded to disk and read layer by layer.")
@section_option("--segments", type=click.IntRange(min=1), default=4, show_default=True, section=QUALITY, help="Prompts scored.")
@section_option("--prompt-len", type=click.IntRange(min=2), default=1024, show_default=True, section=QUALITY, help="Tokens of each prompt, compressed as generate() does.")
@section_option("--score-tokens", type=click.IntRange(min=1), default=128, show_default=True, section=QUALITY, help="Tokens scored after each compressed prompt.")
@section_option("--context", "speed_context", type=click.IntRange(min=2), default=512, show_default=True, section=QUALITY, help="Context length of the speed test.")
@section_option("--lengths", default=None, section=PASSKEY, help="Prompt lengths in tokens. [passkey: 1024,2048; retrieval: 1024,2048,4096]")
@section_option("--protocol", type=click.Choice(["query-aware", "context-only", "both"]), default="both", show_default=True, section=PASSKEY, help="query-aware: the question ends the prompt; context-only: the context is compressed before the question is known.")
@section_option("--probe", is_flag=True, section=PASSKEY, help="context-only: score the context with a generic question.")
@section_option("--per-depth", type=click.IntRange(min=1), default=2, show_default=True, section=PASSKEY, help="passkey: prompts per depth (depths 10%, 50%, 90%).")
@section_option("--tasks", default=",".join(DEFAULT_RETRIEVAL_TASKS), section=RETRIEVAL, help="Comma-separated tasks. [all]")
@section_option("--samples", type=click.IntRange(min=1), default=5, show_default=True, section=RETRIEVAL, help="Prompts per (task, length), depths spread evenly.")
@section_option("--seed", type=int, default=0, show_default=True, section=RETRIEVAL, help="Seed of the generated prompts.")
@section_option("--prompt-format", type=click.Choice(list(PROMPT_FORMATS)), default=DEFAULT_FORMAT, show_default=True, section=RETRIEVAL, help="; ".join(f"{name}: {text}" for name, text in PROMPT_FORMATS.items()) + ".")
@section_option("--lm-eval", "lm_eval_tasks", default=None, section=HARNESS, help="Run these lm-eval tasks instead (comma-separated, e.g. hellaswag,arc_easy).")
@section_option("--lm-eval-include", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, section=HARNESS, help="A folder of extra lm-eval task YAMLs.")
@section_option("--limit", type=click.IntRange(min=1), default=None, section=HARNESS, help="Documents per task (default: all).")
@section_option("--num-fewshot", type=click.IntRange(min=0), default=None, section=HARNESS, help="Few-shot examples (default: the task's).")
@section_option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, section=HARNESS, help="lm-eval's batch size.")
@click.pass_context
@friendly_errors
def eval_command(ctx, checkpoint, task, baseline, keep, data, json_path, allow_pickle, max_memory, segments,
                 prompt_len, score_tokens, speed_context, lengths, protocol, probe, per_depth, tasks, samples, seed,
                 prompt_format, lm_eval_tasks, lm_eval_include, limit, num_fewshot, batch_size):
    """Measure CHECKPOINT as generate() uses it: perplexity and greedy agreement through compressed prompts, KV
    bytes from the cache, speed, memory; or pass-key retrieval. Results go to eval_results.json."""
    from surgery.checkpoint.card import render_card
    from surgery.checkpoint.records import default_results_path, write_results

    max_memory = None if max_memory is None else parse_size(max_memory)
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


@main.command()
@click.argument("checkpoint")
@click.option("--prompt", default="Write one sentence about the sea.", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--baseline", default=None, help="Also answer with this model (e.g. the source), for a side-by-side look.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled .bin weights (CHECKPOINT or --baseline).")
@friendly_errors
def generate(checkpoint, prompt, max_new_tokens, baseline, allow_pickle):
    """Greedy-generate from CHECKPOINT (and --baseline), using the chat template when there is one."""
    if not prompt.strip():
        raise SurgeryError("--prompt is empty", hint='pass some text, e.g. --prompt "Name three rivers in Europe."')
    from surgery.evals.evaluate import resolve_inputs
    from surgery.checkpoint.loading import load_source_model

    source, base_source, tokenizer = resolve_inputs(checkpoint, baseline, allow_pickle)
    answers = [(checkpoint, load_source_model(source))]
    if base_source is not None:
        answers.append((baseline, load_source_model(base_source)))
    for name, model in answers:
        text = greedy_answer(model, tokenizer, prompt, max_new_tokens)
        click.echo(f"{name}: {text}" if base_source is not None else text)


@main.command("compare")
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--baseline", required=True, help="The model every checkpoint is compared with (e.g. their source).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for compare.md, compare.json and the PNG plots.")
@click.option("--overwrite", is_flag=True, help="Replace --out when it exists.")
@click.option("--tasks", default="niah_single_number,niah_multikey", show_default=True, help="Retrieval tasks (comma-separated).")
@click.option("--lengths", default="1024,2048", show_default=True, help="Retrieval prompt lengths in tokens.")
@click.option("--samples", type=click.IntRange(min=1), default=5, show_default=True, help="Retrieval prompts per (task, length).")
@click.option("--segments", type=click.IntRange(min=1), default=4, show_default=True, help="Perplexity prompts.")
@click.option("--prompt-len", type=click.IntRange(min=2), default=1024, show_default=True, help="Tokens of each perplexity prompt.")
@click.option("--prompt-format", type=click.Choice(list(PROMPT_FORMATS)), default=DEFAULT_FORMAT, show_default=True, help="Retrieval prompt format.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the retrieval prompts.")
@click.option("--data", default=None, help="Perplexity text (default: python-reference, offline).")
@click.option("--title", default="", help="Heading of compare.md.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled .bin weights.")
@click.pass_context
@friendly_errors
def compare_command(ctx, checkpoints, baseline, out, overwrite, tasks, lengths, samples, segments, prompt_len,
                    prompt_format, seed, data, title, allow_pickle):
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


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


if __name__ == "__main__":
    main(prog_name="surgery")
