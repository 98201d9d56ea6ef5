"""The rewrite stage: the new checkpoint's tensors, made from the source's, streamed shard by shard.

Each recipe says, tensor by tensor, what changes (`TensorPlan`):
- rename: a new tensor is a source tensor under another name (LESA shifts layer indices);
- derive: a new tensor is a function of source tensors (LESA predicts a layer from its neighbours, AdaMoE adds
  router rows, MoE families fuse or split experts);
- add: a tensor the recipe computed itself (MatryoshkaKV's bases);
- drop: a source tensor the new model does not hold. Anything the new model does not expect is dropped anyway
  (a sharing layer's k_proj); `drop` makes it explicit in the report.
Every tensor the new model expects and no rule names is copied under its own name; a rule for a tensor it does not
hold (one a later recipe removed, as KVSharer removes a grown layer's k_proj) lapses.

Source tensors are read one at a time, shard by shard. A derived tensor waits until all its inputs have been
read, is computed, and its inputs are freed, so the stage holds at most the tensors in flight, the inputs of
derivations still waiting, and the writer's pending shard: about one shard, never the model.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from surgery.base.errors import SurgeryError
from surgery.checkpoint.tensor_io import LazyCheckpoint, check_finite, release_freed_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Derivation:
    inputs: tuple[str, ...]
    build: Callable[..., torch.Tensor]


@dataclass
class TensorPlan:
    """How the new checkpoint's tensors come from the source's. Later rules for the same name win."""

    renamed: dict[str, str] = field(default_factory=dict)  # new name -> source name
    derived: dict[str, Derivation] = field(default_factory=dict)  # new name -> inputs and function
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # new name -> tensor
    dropped: set[str] = field(default_factory=set)  # source names not carried over

    def rename(self, new: str, source: str) -> None:
        self._forget(new)
        self.renamed[new] = source

    def derive(self, new: str, inputs: list[str] | tuple[str, ...], build: Callable[..., torch.Tensor]) -> None:
        self._forget(new)
        self.derived[new] = Derivation(tuple(inputs), build)

    def add(self, new: str, tensor: torch.Tensor) -> None:
        self._forget(new)
        self.added[new] = tensor

    def derive_from(self, new: str, base: str, build: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """`new` = build(tensor `base` of the new model), whichever rule an earlier recipe gave `base` (a layer
        that depth growth renamed or made is upcycled from what growth made)."""
        if base in self.added:
            self.add(new, build(self.added[base]))
        elif base in self.derived:
            inner = self.derived[base]
            self.derive(new, inner.inputs, lambda *inputs: build(inner.build(*inputs)))
        else:
            self.derive(new, [self.renamed.get(base, base)], build)

    def drop(self, source: str) -> None:
        self.dropped.add(source)

    def _forget(self, new: str) -> None:
        for rules in (self.renamed, self.derived, self.added):
            rules.pop(new, None)

    def tensor(self, new: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """One new tensor, made from the source tensors `read` returns: for planning on what recipes left."""
        if new in self.added:
            return self.added[new]
        if new in self.derived:
            derivation = self.derived[new]
            return derivation.build(*(read(source) for source in derivation.inputs))
        return read(self.renamed.get(new, new))

    def sources_of(self, new: str) -> tuple[str, ...]:
        """The source tensors a new tensor is made from (none for an added tensor)."""
        if new in self.added:
            return ()
        if new in self.derived:
            return self.derived[new].inputs
        return (self.renamed.get(new, new),)


@dataclass
class RewriteReport:
    written: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    peak_held_bytes: int = 0  # the most tensor bytes the stage held at once (pending inputs and output)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class DictWriter:
    """Collects the rewritten tensors in memory (for a planning model), with the writer's interface."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.held_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor
        self.held_bytes += _nbytes(tensor)

    def finish(self) -> dict[str, torch.Tensor]:
        return self.tensors


def rewrite(source_folder: Path, expected: dict[str, tuple[int, ...]], plan: TensorPlan, writer,
            dtype: torch.dtype | None = None, progress: bool = False) -> RewriteReport:
    """Stream the source into `writer` (a ShardWriter or DictWriter) following `plan`; every tensor in `expected`
    (name -> shape) is written exactly once, with that shape, finite, in `dtype` when it is floating point."""
    consumers: dict[str, list[str]] = {}
    for new in expected:
        for source in plan.sources_of(new):
            consumers.setdefault(source, []).append(new)

    report = RewriteReport()
    waiting: dict[str, dict[str, torch.Tensor]] = {new: {} for new in plan.derived if new in expected}
    held = 0

    def emit(new: str, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != expected[new]:
            raise SurgeryError(f"{new} has shape {tuple(tensor.shape)}, expected {expected[new]}",
                               hint="the weights and config.json of the source do not match")
        check_finite(new, tensor)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        writer.add(new, tensor)
        report.written.append(new)

    reader = LazyCheckpoint(source_folder)
    for shard in tqdm(reader.shards(), desc="writing shards", unit="shard", disable=not progress):
        for name, tensor in reader.iter_shard(shard):
            if name not in consumers or name in plan.dropped:
                report.dropped.append(name)
                continue
            report.peak_held_bytes = max(report.peak_held_bytes, held + _nbytes(tensor) + _pending(writer))
            for new in consumers[name]:
                if new not in waiting:
                    emit(new, tensor)
                    continue
                waiting[new][name] = tensor
                held += _nbytes(tensor)
                derivation = plan.derived[new]
                if len(waiting[new]) == len(derivation.inputs):
                    inputs = waiting.pop(new)
                    held -= sum(_nbytes(t) for t in inputs.values())
                    emit(new, derivation.build(*(inputs[source] for source in derivation.inputs)))
            report.peak_held_bytes = max(report.peak_held_bytes, held + _pending(writer))
        release_freed_memory()
    for new, tensor in plan.added.items():  # rules for tensors a later recipe removed (a sharer's k_proj) lapse
        if new in expected:
            emit(new, tensor)
    missing = sorted(set(expected) - set(report.written))
    if missing:
        source = plan.sources_of(missing[0])
        raise SurgeryError(f"the source lacks {len(missing)} tensors the new model needs, e.g. {missing[0]} "
                           f"(from {', '.join(source) or 'a recipe'})", hint="the source checkpoint is incomplete")
    return report


def _pending(writer) -> int:
    return writer.held_bytes
