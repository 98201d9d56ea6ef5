"""One conversion, in one direction: source -> calibrate -> plan -> rewrite -> export -> verify (-> eval)."""

import logging
import math
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery import __version__
from surgery.arch.configuration_surgery import SurgeryConfig
from surgery.calibrate.text import CalibrationSettings, calibration_ids, check_text_source
from surgery.checkpoint.card import render_card
from surgery.checkpoint.records import EVAL_FILE
from surgery.calibrate.corpora import DEFAULT_CALIBRATION, SELF_GENERATED
from surgery.base.errors import SurgeryError
from surgery.base.sizes import DEFAULT_SHARD_SIZE
from surgery.checkpoint.export import DTYPES, check_source_tensors, expected_tensors, finish_checkpoint, write_weights
from surgery.checkpoint.families import plain_family_config, surgery_config_from_source
from surgery.calibrate.layer_runner import LayerRunner
from surgery.calibrate.source_model import load_sampling_model
from surgery.checkpoint.loading import has_tokenizer, load_tokenizer
from surgery.base.memory import available_memory
from surgery.base.outputs import check_output, exclusive, staging
from surgery.recipes import Recipe, check_composition
from surgery.checkpoint.rewrite import TensorPlan
from surgery.checkpoint.sources import Source, resolve
from surgery.checkpoint.tensor_io import LazyCheckpoint, check_all_finite
from surgery.checkpoint.gguf_stream import read_provenance
from surgery.checkpoint.records import write_results
from surgery.evals.evaluate import evaluate, far_from_source, print_report
from surgery.evals.evaluate import quick_check

log = logging.getLogger(__name__)



@dataclass
class ConvertRequest:
    """Everything one conversion needs; `command` is recorded so recipe.yaml can reproduce it."""

    model: str
    recipes: list[Recipe]
    out: Path
    calib: str | None = None
    num_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    calib_batch_size: int = 8
    dtype: str | None = None
    max_shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    verify: bool = True
    evaluate: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    device: str = "auto"
    compute_dtype: str = "auto"
    revision: str | None = None
    progress: bool = True
    command: str = ""
    eval_options: dict = field(default_factory=dict)


def tensor_plan(recipes: list[Recipe]) -> TensorPlan:
    """Every recipe's rewrite rules, in composition order: later rules for the same tensor win."""
    plan = TensorPlan()
    for recipe in recipes:
        recipe.rewrite(plan)
    return plan


def calibration_settings(request: ConvertRequest, source: Source) -> CalibrationSettings | None:
    """The recipe's paper defaults, overridden by what the user passed; None when no recipe calibrates. A source
    without a tokenizer cannot read the default text, so it samples its own (from the BOS id in its config)."""
    wanted = [recipe.calibration for recipe in request.recipes if recipe.calibration is not None]
    if not wanted:
        return None
    text = request.calib or DEFAULT_CALIBRATION
    check_text_source(text)
    if request.calib is None and not has_tokenizer(source.folder):
        log.warning("%s has no tokenizer: calibrating on text it samples itself", source.name)
        text = SELF_GENERATED
    return CalibrationSettings(
        source=text,
        num_samples=request.num_samples or max(w.num_samples for w in wanted),
        seq_len=request.seq_len or max(w.seq_len for w in wanted),
        seed=request.seed,
    )


def calibration_device(name: str) -> str:
    """`--device`: auto takes CUDA when it is visible."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("--device cuda, but no CUDA device is visible", hint="pass --device cpu or auto")
    return name


def compute_dtype(name: str, device: str) -> torch.dtype:
    """`--compute-dtype`: auto is bfloat16 on CUDA and float32 on CPU (where bfloat16 matmuls are slow). Every
    recipe's statistics allow bfloat16: K/V moments accumulate in float64, KL and cosines in float32."""
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    if name not in DTYPES:
        raise SurgeryError(f"unknown --compute-dtype {name!r}", hint=f"choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def float32_bytes(source: Source) -> int:
    return 4 * sum(math.prod(shape) for shape in LazyCheckpoint(source.folder).shapes().values())


def output_bytes(config: SurgeryConfig, family, dtype: torch.dtype) -> int:
    """The weights the checkpoint will hold, from its planned shapes (what a full disk is told is needed)."""
    shapes = expected_tensors(family if family is not None else config)
    return dtype.itemsize * sum(math.prod(shape) for shape in shapes.values())


def fits_twice(source: Source) -> bool:
    """Whether the source and its conversion fit in memory together, in float32, for the quality check."""
    needed = 2 * float32_bytes(source)
    available = available_memory()
    return not available or needed < 0.5 * available


def plan_recipes(request: ConvertRequest, source: Source, config: SurgeryConfig,
                 settings: CalibrationSettings | None) -> list[dict]:
    """Run calibration once and let each recipe plan, in order, on what the recipes before it left.

    Every recipe calibrates on a LayerRunner (one decoder layer in memory) that builds the layers as the
    recipes before it planned them. The whole model is loaded only to sample self-generated calibration text.
    """
    if settings is None:  # no calibration: each recipe still reads the weights as the recipes before it left them
        plans = []
        for done, recipe in enumerate(request.recipes):
            runner = LayerRunner(source.folder, config, None, request.calib_batch_size, torch.float32,
                                 request.progress, plan=tensor_plan(request.recipes[:done]))
            with torch.no_grad():
                plans.append(recipe.plan(runner, None, request.seed, request.progress))
            recipe.apply(config, plans[-1])
        return plans
    torch.manual_seed(request.seed)
    tokenizer = load_tokenizer(source.folder, request.trust_remote_code)
    model = None
    if settings.source == SELF_GENERATED:  # sampled over the mapped shards: no copy of the model in memory
        model = load_sampling_model(source, config)
    log.info("calibration: %d × %d tokens of %s", settings.num_samples, settings.seq_len, settings.description)
    ids = calibration_ids(settings, tokenizer, model)
    del model
    plans = []
    for done, recipe in enumerate(request.recipes):
        device = calibration_device(request.device)
        runner = LayerRunner(source.folder, config, ids, request.calib_batch_size,
                             compute_dtype(request.compute_dtype, device), request.progress, device,
                             plan=tensor_plan(request.recipes[:done]))
        with torch.no_grad():  # planning never trains
            plan = recipe.plan(runner, ids, request.seed, request.progress)
        recipe.apply(config, plan)
        plans.append(plan)
    return plans


def source_license(folder: Path) -> str | None:
    """The license in the source model card's front matter, carried into ours."""
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.license
    except Exception:  # a malformed source card must not stop a conversion
        return None


def gguf_origin(folder: Path) -> dict:
    """{"gguf": ...} when the source was dequantized from a GGUF file (see gguf_stream.PROVENANCE_FILE)."""

    provenance = read_provenance(folder)
    return {"gguf": provenance} if provenance else {}


def recipe_record(request: ConvertRequest, source: Source, settings: CalibrationSettings | None,
                  plans: list[dict], dtype: torch.dtype) -> dict:
    return {
        "surgery_version": __version__,
        "command": request.command,
        "source": {"model": request.model, "name": source.name, "model_type": source.model_type,
                   "license": source_license(source.folder), **gguf_origin(source.folder)},
        "recipes": [
            {"name": recipe.name, "paper": recipe.paper, "saves": recipe.saves, "options": recipe.options(),
             "plan": plan, "summary": recipe.describe(plan)}
            for recipe, plan in zip(request.recipes, plans)
        ],
        "calibration": None if settings is None else {
            "data": settings.description, "source": settings.source, "num_samples": settings.num_samples,
            "seq_len": settings.seq_len, "seed": settings.seed, "batch_size": request.calib_batch_size,
            "python": platform.python_version(), "device": request.device,
            "compute_dtype": str(compute_dtype(request.compute_dtype, calibration_device(request.device))).removeprefix("torch."),
        },
        "export": {"dtype": str(dtype).removeprefix("torch."), "max_shard_size": request.max_shard_size},
    }


def convert(request: ConvertRequest) -> Path:
    """Convert `request.model` and write the checkpoint to `request.out`; returns the output folder."""
    if request.dtype is not None and request.dtype not in DTYPES:
        raise SurgeryError(f"unknown --dtype {request.dtype!r}", hint=f"choose from {', '.join(DTYPES)}")
    if request.max_shard_size < 1:
        raise SurgeryError(f"--max-shard-size {request.max_shard_size} is not a size", hint="e.g. --max-shard-size 5G")
    out = Path(request.out)
    check_composition(request.recipes)
    compute_dtype(request.compute_dtype, calibration_device(request.device))
    check_output(out, [Path(request.model)] if Path(request.model).exists() else [])
    if out.exists() and not request.overwrite:
        raise SurgeryError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    source = resolve(request.model, request.allow_pickle, request.revision)
    check_output(out, [source.folder])
    with exclusive(out):
        return _convert(request, source, out)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Log how long a stage of the conversion took (one INFO line; `bench/scale.py` reads them)."""
    began = time.perf_counter()
    yield
    log.info("stage %s: %.1f s", name, time.perf_counter() - began)


def _convert(request: ConvertRequest, source: Source, out: Path) -> Path:
    config = surgery_config_from_source(source.config)
    for recipe in request.recipes:
        recipe.validate(config)
    check_source_tensors(source.folder, config)
    check_all_finite(source.folder, request.progress)
    dtype = DTYPES[request.dtype] if request.dtype else LazyCheckpoint(source.folder).dtype()

    settings = calibration_settings(request, source)
    with stage("calibration and planning"):
        plans = plan_recipes(request, source, config, settings)
    config.surgery_recipes = [recipe.name for recipe in request.recipes]

    # depth growth and upcycling alone: a plain checkpoint of a transformers family, no remote code
    family = plain_family_config(source.config, config) if all(r.keeps_family for r in request.recipes) else None
    with staging(out, request.overwrite, needed=output_bytes(config, family, dtype)) as folder:
        with stage("writing the weights"):
            write_weights(source.folder, config, folder, dtype, request.max_shard_size, request.progress,
                          tensor_plan(request.recipes), family=family.model_type if family is not None else None)
        with stage("config, code, tokenizer" + (" and verify" if request.verify else "")):
            finish_checkpoint(folder, family if family is not None else config, dtype, source.folder,
                              recipe_record(request, source, settings, plans, dtype), request.verify,
                              request.trust_remote_code)
        if request.evaluate:

            results = evaluate(folder, str(source.folder), progress=request.progress, **request.eval_options)
            write_results(results, folder / EVAL_FILE)
            print_report(results)
            warning = far_from_source(results, request.recipes)
        elif request.verify and fits_twice(source) and has_tokenizer(source.folder):

            with stage("quality check"):
                warning = quick_check(folder, source.folder, request.recipes)
        else:
            warning = None
        if warning:
            log.warning("warning: %s", warning)
        render_card(folder, model_id=str(out))
    return out
