"""Write a converted checkpoint: streamed shards, config with auto_map, flat remote code, tokenizer, recipe and card.

Everything is written into a staging folder beside `--out` and renamed into place at the end, so a failed or
interrupted run leaves `--out` as it was.
"""

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch.configuration_surgery import SurgeryConfig
from .arch.modeling_surgery import SurgeryForCausalLM
from .errors import SurgeryError
from .tensor_io import LazyCheckpoint, ShardWriter

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).parent
REMOTE_CODE_DIRS = (PACKAGE_ROOT / "arch", PACKAGE_ROOT / "kernels")
AUTO_MAP = {
    "AutoConfig": "configuration_surgery.SurgeryConfig",
    "AutoModel": "modeling_surgery.SurgeryModel",
    "AutoModelForCausalLM": "modeling_surgery.SurgeryForCausalLM",
}
# Non-weight files carried over from the source: tokenizer, chat template, generation defaults.
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def remote_code_files() -> list[Path]:
    """The files every checkpoint ships: arch/ and kernels/ modules, flat, importing each other relatively."""
    return sorted(p for folder in REMOTE_CODE_DIRS for p in folder.glob("*.py") if p.name != "__init__.py")


def bundle_remote_code(folder: Path) -> list[str]:
    names = []
    for path in remote_code_files():
        shutil.copyfile(path, folder / path.name)
        names.append(path.name)
    return names


@contextlib.contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh folder beside `out` that replaces `out` only if the block finishes without an exception."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SurgeryError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise SurgeryError(f"{out} exists and is not a folder", hint="choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
        if out.exists():
            backup = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(backup)
            temp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            temp.rename(out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def expected_tensors(config: SurgeryConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors the converted model owns, from a model built on the meta device."""
    with torch.device("meta"):
        model = SurgeryForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def write_weights(source_folder: Path, config: SurgeryConfig, folder: Path, dtype: torch.dtype | None,
                  max_shard_size: int, progress: bool = True,
                  new_tensors: dict[str, torch.Tensor] | None = None) -> dict[str, list[str]]:
    """Stream the source shard by shard into the new layout: copy what the plan keeps, drop the rest, then add
    the tensors the recipes created (or replaced)."""
    new_tensors = new_tensors or {}
    expected = expected_tensors(config)
    reader = LazyCheckpoint(source_folder)
    writer = ShardWriter(folder, max_shard_size)
    written, dropped = [], []
    for shard in tqdm(reader.shards(), desc="writing shards", unit="shard", disable=not progress):
        for name, tensor in reader.iter_shard(shard):
            if name not in expected or name in new_tensors:
                dropped.append(name)
                continue
            if tuple(tensor.shape) != expected[name]:
                raise SurgeryError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            writer.add(name, tensor)
            written.append(name)
    for name, tensor in new_tensors.items():
        if name not in expected or tuple(tensor.shape) != expected[name]:
            raise SurgeryError(f"recipe tensor {name} {tuple(tensor.shape)} does not fit the planned model")
        writer.add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
        written.append(name)
    missing = sorted(set(expected) - set(written))
    if missing:
        raise SurgeryError(f"the source lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")
    writer.finish()
    return {"dropped": dropped, "written": written}


def write_config(config: SurgeryConfig, folder: Path, dtype: torch.dtype) -> None:
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["SurgeryForCausalLM"]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)


def carry_files(source_folder: Path, folder: Path) -> list[str]:
    carried = []
    for name in CARRIED_FILES:
        if (source_folder / name).is_file():
            shutil.copyfile(source_folder / name, folder / name)
            carried.append(name)
    return carried


def write_state_dict(state: dict[str, torch.Tensor], config: SurgeryConfig, folder: Path, dtype: torch.dtype,
                     max_shard_size: int) -> None:
    """Write an in-memory model's weights (after `surgery adapt`), one tensor for tied embeddings."""
    expected = expected_tensors(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SurgeryError(f"the trained model lacks {len(missing)} tensors, e.g. {missing[0]}")
    writer = ShardWriter(folder, max_shard_size)
    for name in expected:
        tensor = state[name].detach()
        writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.finish()


def finish_checkpoint(folder: Path, config: SurgeryConfig, dtype: torch.dtype, files_from: Path, record: dict,
                      verify: bool) -> None:
    """Everything but the weights: config with auto_map, flat remote code, tokenizer files, recipe.yaml; verify."""
    from .card import write_recipe
    from .verify import verify_checkpoint

    write_config(config, folder, dtype)
    bundle_remote_code(folder)
    carry_files(files_from, folder)
    write_recipe(folder, record)
    if verify:
        log.info("verifying the checkpoint in a fresh interpreter without surgery")
        verify_checkpoint(folder)
