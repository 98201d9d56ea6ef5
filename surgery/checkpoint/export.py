"""Write a converted checkpoint: streamed shards, config with auto_map, flat remote code, tokenizer, recipe and card.

Callers write into `outputs.staging`, so a failed or interrupted run leaves `--out` as it was.
"""

import ast
import json
import logging
import re
from pathlib import Path

import torch

from surgery.arch.configuration_surgery import SURGERY_FORMAT, SurgeryConfig
from surgery.arch.modeling_surgery import SurgeryForCausalLM
from surgery.arch.runtime_surgery import BLOCK_END, BLOCK_START
from surgery.base.errors import SurgeryError
from surgery.checkpoint.layouts import family_extras, family_name
from surgery.checkpoint.rewrite import RewriteReport, TensorPlan, rewrite
from surgery.checkpoint.tensor_io import LazyCheckpoint, ShardWriter
from surgery.checkpoint.families import family_model_class
from surgery.checkpoint.loading import write_tokenizer_files
from surgery.checkpoint.records import write_recipe
from surgery.checkpoint.verify import verify_checkpoint

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).parent.parent
REMOTE_CODE_DIRS = (PACKAGE_ROOT / "arch", PACKAGE_ROOT / "kernels")
MODELING, CONFIGURATION = "modeling_surgery.py", "configuration_surgery.py"
AUTO_MAP = {
    "AutoConfig": "configuration_surgery.SurgeryConfig",
    "AutoModel": "modeling_surgery.SurgeryModel",
    "AutoModelForCausalLM": "modeling_surgery.SurgeryForCausalLM",
}
# Beside the tokenizer files (`loading.TOKENIZER_FILES`, cleaned of any auto_map), carried from the source.
GENERATION_CONFIG = "generation_config.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def remote_code_files() -> list[Path]:
    """Every module a checkpoint may ship: arch/ and kernels/, flat, importing each other relatively."""
    return sorted(p for folder in REMOTE_CODE_DIRS for p in folder.glob("*.py") if p.name != "__init__.py")


RELATIVE_IMPORT = re.compile(r"^\s*from \.(\w+) import", re.MULTILINE)


def _public_name(source: str) -> str:
    """One name a module defines, to import it by: the first of `__all__`, else its first class or function."""
    body = ast.parse(source).body
    for node in body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return node.value.elts[0].value
    return next(node.name for node in body if isinstance(node, (ast.ClassDef, ast.FunctionDef)))


def _closure(sources: dict[str, str], roots: list[str]) -> list[str]:
    """The modules `roots` import relatively, directly or not, the roots included."""
    needed, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in needed or f"{name}.py" not in sources:
            continue
        needed.add(name)
        todo += RELATIVE_IMPORT.findall(sources[f"{name}.py"])
    return sorted(needed)


def runtime_block(fixed_modeling: str, sources: dict[str, str], runtime_modules: list[str]) -> str:
    """The block of `modeling_surgery.py` that names the recipes' runtime modules a plan uses, and every other module
    the checkpoint ships that the rest of the file does not import itself: transformers before 5.23 copies only the
    files that a checkpoint's main module imports directly."""
    direct = set(RELATIVE_IMPORT.findall(fixed_modeling))
    runtimes = [f"{module}_surgery" for module in runtime_modules]
    shipped = _closure({**sources, MODELING: fixed_modeling}, [stem(MODELING), *runtimes])
    helpers = [m for m in shipped if m not in runtimes and m not in direct and m != stem(MODELING)]
    lines = [BLOCK_START + ": the recipes' runtime modules this model may run (surgery writes this list per checkpoint)"]
    lines += [f"from .{m} import {_public_name(sources[m + '.py'])}  # noqa: E402,F401" for m in helpers]
    lines += [f"from .{m} import RUNTIME as {m.removesuffix('_surgery')}_runtime  # noqa: E402" for m in runtimes]
    names = [f"{m.removesuffix('_surgery')}_runtime" for m in runtimes]
    lines.append("RUNTIMES = (" + "".join(f"\n    {name}," for name in names) + ("\n)" if names else ")"))
    lines.append(BLOCK_END)
    return "\n".join(lines)


def with_runtime_block(modeling: str, sources: dict[str, str], runtime_modules: list[str]) -> str:
    """`modeling_surgery.py` with its runtime block rewritten for these runtime modules."""
    head, rest = modeling.split(BLOCK_START, 1)
    tail = rest.split(BLOCK_END, 1)[1]
    return head + runtime_block(head + tail, sources, runtime_modules) + tail


def stem(name: str) -> str:
    return name.removesuffix(".py")


def remote_code(config) -> dict[str, bytes]:
    """The files a checkpoint of this config ships, by name: the core, the runtime modules its plan uses (named in
    the generated block of `modeling_surgery.py`), and what those import, the kernels included. An identity
    checkpoint carries no recipe's runtime."""
    sources = {path.name: path.read_text() for path in remote_code_files()}
    sources[MODELING] = with_runtime_block(sources[MODELING], sources, config.runtime_modules())
    files = _closure(sources, [stem(MODELING), stem(CONFIGURATION)])
    return {f"{name}.py": sources[f"{name}.py"].encode() for name in files}


def bundle_remote_code(folder: Path, config) -> list[str]:
    files = remote_code(config)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


def is_surgery(config) -> bool:
    """A surgery checkpoint (remote code) rather than a plain one of the source family (depth growth alone)."""
    return config.model_type == SurgeryConfig.model_type


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors the converted model owns, from a model built on the meta device."""

    with torch.device("meta"):
        model = SurgeryForCausalLM(config) if is_surgery(config) else family_model_class(config.model_type)(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_source_tensors(source_folder: Path, config: SurgeryConfig) -> None:
    """Before any work: every tensor the identity model needs is in the source, with the shape config.json implies."""
    expected = expected_tensors(config)
    shapes = LazyCheckpoint(source_folder).shapes()
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise SurgeryError(f"the source lacks {len(missing)} tensors its config.json implies, e.g. {missing[0]}",
                           hint="the weights and config.json of the source do not match")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise SurgeryError(f"{name} has shape {shapes[name]}, but config.json implies {shape}",
                               hint="the weights and config.json of the source do not match")


def write_weights(source_folder: Path, config: SurgeryConfig, folder: Path, dtype: torch.dtype | None,
                  max_shard_size: int, progress: bool = True, plan: TensorPlan | None = None,
                  family: str | None = None) -> RewriteReport:
    """The rewrite stage into sharded safetensors: the source streamed shard by shard into the planned layout;
    `family`: a plain checkpoint of that family, its tensors under the names the family saves."""
    writer = family_writer(ShardWriter(folder, max_shard_size), config, family, dtype)
    report = rewrite(source_folder, expected_tensors(config), plan or TensorPlan(), writer, dtype, progress)
    writer.finish()
    return report


def family_writer(writer, config: SurgeryConfig, family: str | None, dtype: torch.dtype | None):
    """`writer`, or for a plain checkpoint of `family` one that writes the family's names and, before the shards
    close, the tensors the family holds beyond the surgery model."""
    if family is None:
        return writer
    extras = {name: tensor.to(dtype) if dtype is not None else tensor
              for name, tensor in family_extras(family, config).items()}
    return RenamingWriter(writer, lambda name: family_name(family, name), extras)


class RenamingWriter:
    """A writer that stores each tensor under another name, and `extras` as they are when it finishes."""

    def __init__(self, writer, rename, extras: dict[str, torch.Tensor] | None = None):
        self.writer, self.rename, self.extras = writer, rename, extras or {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(self.rename(name), tensor)

    @property
    def held_bytes(self) -> int:
        return self.writer.held_bytes

    def finish(self):
        for name, tensor in self.extras.items():
            self.writer.add(name, tensor)
        return self.writer.finish()


def write_config(config, folder: Path, dtype: torch.dtype) -> None:
    if is_surgery(config):
        config.auto_map = dict(AUTO_MAP)
        config.surgery_format = SURGERY_FORMAT
        config.architectures = ["SurgeryForCausalLM"]
    else:

        config.architectures = [family_model_class(config.model_type).__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)


def carry_files(source_folder: Path, folder: Path, trust_remote_code: bool = False) -> list[str]:
    """The tokenizer files (never with an auto_map) and the generation defaults of the source."""

    carried = write_tokenizer_files(source_folder, folder, trust_remote_code)
    generation = source_folder / GENERATION_CONFIG
    if generation.is_file():
        try:
            settings = json.loads(generation.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            settings = None
        if isinstance(settings, dict):
            (folder / GENERATION_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
            carried.append(GENERATION_CONFIG)
        else:
            log.warning("skipped %s: not a JSON object", generation)
    return carried


def write_state_dict(state: dict[str, torch.Tensor], config, folder: Path, dtype: torch.dtype,
                     max_shard_size: int, family: str | None = None) -> None:
    """Write an in-memory surgery model's weights (after `surgery adapt`), one tensor for tied embeddings;
    `family`: as a plain checkpoint of that family."""
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SurgeryError(f"the trained model lacks {len(missing)} tensors, e.g. {missing[0]}")
    writer = family_writer(ShardWriter(folder, max_shard_size), config, family, dtype)
    for name in expected:
        tensor = state[name].detach()
        writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.finish()


def finish_checkpoint(folder: Path, config, dtype: torch.dtype, files_from: Path, record: dict,
                      verify: bool, trust_remote_code: bool = False) -> None:
    """Everything but the weights: config (with auto_map and the flat remote code, unless the checkpoint is of the
    source family), tokenizer files, recipe.yaml; verify."""

    write_config(config, folder, dtype)
    if is_surgery(config):
        bundle_remote_code(folder, config)
    carry_files(files_from, folder, trust_remote_code)
    write_recipe(folder, record)
    if verify:
        log.info("verifying the checkpoint in a fresh interpreter without surgery")
        verify_checkpoint(folder, remote_code=is_surgery(config))
