"""Lazy safetensors reading and streaming sharded writing, so a conversion never holds the model twice."""

import ctypes
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from surgery.base.errors import SurgeryError, first_line
from surgery.checkpoint.layouts import source_aliases

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them otherwise, and a walk over many layers, each freed
    after use, would then look (and count, for the OOM killer) like a model held in full."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Name the tensor that holds NaN or inf, before it poisons calibration or lands in a checkpoint."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise SurgeryError(f"{name} holds NaN or infinite values", hint="the source weights are corrupt; re-download them")


def check_all_finite(folder: Path, progress: bool = True) -> None:
    """Stream every tensor of a source once, before any recipe reads it, and name the first that holds NaN or inf.
    Calibrating on such weights fails later as the recipe's own complaint (no layer pair similar enough, a
    singular fit), which sends the user the wrong way."""
    from tqdm.auto import tqdm

    checkpoint = LazyCheckpoint(folder)
    with tqdm(total=len(checkpoint.stored_map), desc="checking the weights are finite", unit="tensor", disable=not progress) as bar:
        for shard in sorted(set(checkpoint.stored_map.values())):
            with safe_open(checkpoint.folder / shard, framework="pt") as handle:
                for name in handle.keys():
                    check_finite(name, handle.get_tensor(name))
                    bar.update()
            release_freed_memory()


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise SurgeryError(f"{index} is not a valid index: {first_line(error)}",
                           hint="re-download the model or delete the index of a single-shard model") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) and isinstance(k, str) for k, v in weight_map.items()):
        raise SurgeryError(f"{index} has no weight_map of tensor names to shard files",
                           hint="re-download the model or delete the index of a single-shard model")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or not (index.parent / shard).is_file():
            raise SurgeryError(f"{index} names a missing shard {shard!r}", hint="re-download the model")
    return weight_map


class LazyCheckpoint:
    """Tensor names of a folder of safetensors shards; each tensor is read only when asked for."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = _read_weight_map(index)
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise SurgeryError(f"no .safetensors weights in {self.folder}", hint="convert from a safetensors model")
            weight_map = {name: shard.name for shard in shards for name in self._header_names(shard)}
        for shard in sorted(set(weight_map.values())):
            self._header_names(self.folder / shard)  # fail early on a missing or corrupt shard
        # Names the surgery architecture reads under other names (Mixtral's experts, fused experts): see layouts.py
        self.aliases = source_aliases(list(weight_map), lambda name: self._stored_shape(weight_map[name], name),
                                      self._config())
        self.stored_map: dict[str, str] = weight_map  # stored name -> shard
        stored_aliased = {alias.stored for alias in self.aliases.values()}
        self.weight_map: dict[str, str] = {name: shard for name, shard in weight_map.items() if name not in stored_aliased}
        self.weight_map.update({name: weight_map[alias.stored] for name, alias in self.aliases.items()})
        self._views: dict[str, list[str]] = {}  # stored name -> the surgery names it holds
        for name, alias in self.aliases.items():
            self._views.setdefault(alias.stored, []).append(name)

    def _config(self) -> dict | None:
        """The folder's config.json (a text model's own fields), for layouts that split by head counts."""
        try:
            config = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return config.get("text_config") or config if isinstance(config, dict) else None

    @staticmethod
    def _header_names(shard: Path) -> list[str]:
        try:
            with safe_open(shard, framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError, ValueError) as error:
            raise SurgeryError(
                f"cannot read safetensors file {shard}: {error}", hint="re-download or re-export the source"
            ) from None

    def _stored_shape(self, shard: str, name: str) -> tuple[int, ...]:
        with safe_open(self.folder / shard, framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """One tensor, by its surgery name, read from its shard."""
        alias = self.aliases.get(name)
        with safe_open(self.folder / self.weight_map[name], framework="pt") as handle:
            return handle.get_tensor(name) if alias is None else alias.take(handle.get_tensor(alias.stored))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape (by surgery name), from the shard headers only."""
        shapes = {}
        for shard in self.shards():
            with safe_open(self.folder / shard, framework="pt") as handle:
                for stored in handle.keys():
                    shape = tuple(handle.get_slice(stored).get_shape())
                    for name in self._views.get(stored, [stored]):
                        alias = self.aliases.get(name)
                        shapes[name] = shape if alias is None else alias.shape(shape)
        return shapes

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def iter_shard(self, shard: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tensors of one shard, one at a time, by surgery name (a fused tensor as each expert's part)."""
        with safe_open(self.folder / shard, framework="pt") as handle:
            for stored in handle.keys():
                tensor = handle.get_tensor(stored)
                for name in self._views.get(stored, [stored]):
                    alias = self.aliases.get(name)
                    yield name, tensor if alias is None else alias.take(tensor)

    def dtype(self) -> torch.dtype:
        """The dtype of the floating tensors (the checkpoint's storage dtype)."""
        for shard in self.shards():
            with safe_open(self.folder / shard, framework="pt") as handle:
                for name in handle.keys():
                    dtype = handle.get_slice(name).get_dtype()
                    if dtype in ("F32", "F16", "BF16", "F64"):
                        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                                "F64": torch.float64}[dtype]
        return torch.float32


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class ShardWriter:
    """Write safetensors shards tensor by tensor: each tensor's bytes go to disk as it arrives (a data file per
    shard), and a shard is assembled (header, then the data) once the next tensor would push it past
    `max_shard_size` bytes. It holds no tensor after `add` returns, so writing never buffers a shard in memory."""

    held_bytes = 0  # what the writer keeps in memory between calls (the rewrite stage's accounting)

    def __init__(self, folder: Path, max_shard_size: int):
        if max_shard_size <= 0:
            raise SurgeryError(f"--max-shard-size must be positive, got {max_shard_size}")
        self.folder = Path(folder)
        self.max_shard_size = max_shard_size
        self._entries: dict[str, dict] = {}
        self._shard_bytes = 0
        self._data = None
        self._written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def _data_path(self) -> Path:
        return self.folder / f"shard-{len(self._written):05d}.data"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._shard_bytes + size > self.max_shard_size:
            self._flush()
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise SurgeryError(f"{name} has dtype {tensor.dtype}, which safetensors cannot store")
        if self._data is None:
            self._data = open(self._data_path(), "wb")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if size:
            flat.view(torch.uint8).numpy().tofile(self._data)
        self._entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._shard_bytes, self._shard_bytes + size]}
        self._shard_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        temp_name = f"shard-{len(self._written):05d}.safetensors"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        data_path = self._data_path()
        if self._data is None:
            data_path.write_bytes(b"")
        else:
            self._data.close()
            self._data = None
        with open(self.folder / temp_name, "wb") as shard, open(data_path, "rb") as data:
            shard.write(len(header).to_bytes(8, "little"))
            shard.write(header)
            shutil.copyfileobj(data, shard, 16 * 1024 * 1024)
        data_path.unlink()
        (self.folder / temp_name).chmod(0o644)
        self._written.append((temp_name, list(self._entries)))
        self._entries, self._shard_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names and write the index when there is more than one shard."""
        if self._entries or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            (self.folder / self._written[0][0]).rename(self.folder / SINGLE_NAME)
            return [SINGLE_NAME]
        weight_map, names = {}, []
        for number, (temp_name, tensor_names) in enumerate(self._written, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.folder / temp_name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(tensor_names, final))
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names
