"""The options the commands share, each declared once: safety (`--allow-pickle`, `--trust-remote-code`), output
(`--dtype`, `--max-shard-size`), calibration, and the eval and retrieval settings; recipe and training options come
from their dataclasses. Help lists options under headings (`SectionedCommand`)."""

from dataclasses import MISSING, fields
from pathlib import Path

import click

from surgery.base.errors import SurgeryError
from surgery.base.ranges import click_range, has_range, value_type
from surgery.base.sizes import DEFAULT_SHARD_SIZE, parse_size
from surgery.calibrate.corpora import DEFAULT_CALIBRATION, SELF_GENERATED
from surgery.evals.retrieval import DEFAULT_FORMAT, PROMPT_FORMATS
from surgery.adapt.settings import AdaptSettings
from surgery.recipes import RECIPES, recipe_class

CALIBRATION = "Calibration options"


def compose(*decorators):
    """Apply option decorators in the order listed, as if stacked above a command."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


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


def section_option(*names, section: str = "Options", **kwargs):
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
        if kind is float or (has_range(spec) and kind is int):
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




# --- shared option groups -------------------------------------------------------------------------------------------

def _size(ctx, param, value: str | None) -> int | None:
    """A size option read as bytes; an unreadable one is a usage error naming the option."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except SurgeryError as error:
        raise click.BadParameter(str(error), ctx, param) from None


ALLOW_PICKLE = click.option("--allow-pickle", is_flag=True,
                            help="Allow loading pickled .bin weights (of the model, the teacher or the baseline).")
TRUST_REMOTE_CODE = click.option("--trust-remote-code", is_flag=True,
                                 help="Allow running code surgery did not write: a source tokenizer's own code (re-saved "
                                      "as a standard tokenizer), or a checkpoint folder's edited Python files.")
NO_VERIFY = click.option("--no-verify", is_flag=True, help="Skip loading the result in a fresh interpreter.")
OVERWRITE = click.option("--overwrite", is_flag=True,
                         help="Replace --out if it exists (only once the new checkpoint is complete).")
OUT = click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
DTYPE = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Weight dtype of the checkpoint (default: the source's; a GGUF source is dequantized to float32).")
MAX_SHARD_SIZE = click.option("--max-shard-size", default=None, callback=_size,
                              help=f"Largest shard, in bytes (K/M/G suffixes allowed). [{DEFAULT_SHARD_SIZE // 1024**3}G]")
MAX_MEMORY = click.option("--max-memory", default=None, callback=_size,
                          help="Keep at most this much of the weights in memory (e.g. 4G); the rest is offloaded to disk "
                               "and read layer by layer.")

safety_options = compose(ALLOW_PICKLE, TRUST_REMOTE_CODE)
output_options = compose(OUT, DTYPE, MAX_SHARD_SIZE, OVERWRITE, NO_VERIFY)

calibration_options = compose(
    section_option("--calib", default=None, section=CALIBRATION, help=f"Calibration text: .txt/.jsonl/.parquet, a dataset folder, a Hub dataset name, or `{SELF_GENERATED}` (the source samples its own). [{DEFAULT_CALIBRATION}: stdlib docstrings, offline]"),
    section_option("--num-samples", type=click.IntRange(min=1), default=None, section=CALIBRATION, help="Calibration samples (default: the recipe paper's setting)."),
    section_option("--seq-len", type=click.IntRange(min=2), default=None, section=CALIBRATION, help="Tokens per calibration sample (default: the recipe's)."),
    section_option("--seed", type=int, default=None, section=CALIBRATION, help="Seed of the calibration windows and searches. [0]"),
    section_option("--calib-batch-size", type=click.IntRange(min=1), default=None, section=CALIBRATION, help="Calibration samples per batch through each layer. [8]"),
    section_option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, section=CALIBRATION, help="Where layer-by-layer calibration runs (auto: CUDA when visible). [auto]"),
    section_option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None, section=CALIBRATION, help="Dtype of layer-by-layer calibration: auto is bfloat16 on CUDA, float32 on CPU (statistics accumulate in float32/float64). [auto]"),
)


def quality_options(section: str = "Options"):
    """Perplexity through compressed prompts: how many prompts, how long, and which text."""
    return compose(
        section_option("--segments", type=click.IntRange(min=1), default=4, show_default=True, section=section, help="Perplexity prompts scored."),
        section_option("--prompt-len", type=click.IntRange(min=2), default=1024, show_default=True, section=section, help="Tokens of each perplexity prompt, compressed as generate() does."),
    )


def retrieval_options(section: str, tasks: str, lengths: str | None, lengths_help: str):
    """The RULER-style suite: tasks, lengths, prompts per cell, seed and prompt format (defaults per command)."""
    return compose(
        section_option("--tasks", default=tasks, show_default=True, section=section, help="Retrieval tasks, comma-separated."),
        section_option("--lengths", default=lengths, show_default=lengths is not None, section=section, help=lengths_help),
        section_option("--samples", type=click.IntRange(min=1), default=5, show_default=True, section=section, help="Retrieval prompts per (task, length), depths spread evenly."),
        section_option("--seed", type=int, default=0, show_default=True, section=section, help="Seed of the generated prompts."),
        section_option("--prompt-format", type=click.Choice(list(PROMPT_FORMATS)), default=DEFAULT_FORMAT, show_default=True, section=section, help="; ".join(f"{name}: {text}" for name, text in PROMPT_FORMATS.items()) + "."),
    )
