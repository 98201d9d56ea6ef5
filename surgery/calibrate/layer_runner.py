"""Calibration one decoder layer at a time: memory scales with one layer, not with the model.

The runner embeds the calibration samples once, then walks the decoder: it loads one layer's tensors from the
lazy checkpoint (memory-mapped safetensors), runs every sample batch through it, and frees it. A recording run
keeps the hidden states entering every layer and the post-RoPE K/V of every owner layer, so a search trial that
changes layer i re-runs only layers i.. and reads the K/V of earlier layers from what it kept. A trial is
committed only when the recipe accepts it. The layers are built as the recipes planned so far left them
(`TensorPlan`: sharing, projections, added tensors), so recipes compose on the runner as on a whole model.

Memory: one layer's weights, the embeddings, the final norm or the output head when they are used, and the kept
activations (samples × tokens × hidden size per layer boundary, plus the K/V of the owner layers).
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from surgery.arch.cache_surgery import SurgeryCache
from surgery.arch.configuration_surgery import SurgeryConfig
from surgery.arch.modeling_surgery import (LayerContext, SurgeryDecoderLayer, SurgeryPositionEmbeddings, rms_norm,
                                           scale_embeddings, soft_cap)
from surgery.checkpoint.rewrite import TensorPlan
from surgery.checkpoint.tensor_io import LazyCheckpoint, release_freed_memory

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class RunState:
    """What a run leaves behind: hidden states entering each layer and owner layers' K/V, per sample batch."""

    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    kv: dict[int, list[KV]] = field(default_factory=dict)
    final: list[torch.Tensor] = field(default_factory=list)  # after the final norm


class LayerRunner:
    """Runs calibration token batches through the source checkpoint's decoder, one layer at a time."""

    def __init__(self, folder: Path, config: SurgeryConfig, ids: torch.Tensor | None, batch_size: int,
                 dtype: torch.dtype = torch.float32, progress: bool = False, device: str = "cpu",
                 plan: TensorPlan | None = None):
        self.reader = LazyCheckpoint(folder)
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = "sdpa"  # the calibration path is PyTorch's, on any device
        self.device = torch.device(device)
        self.ids = ids
        self.batch_size = batch_size
        self.batches = [] if ids is None else [batch.to(self.device) for batch in ids.split(batch_size)]
        self.dtype = dtype
        self.progress = progress
        self.plan = plan or TensorPlan()
        self.rotary = SurgeryPositionEmbeddings(self.config).to(self.device)
        self.state = RunState()
        self.kv_source = list(self.config.kv_source)
        self._head: torch.Tensor | None = None

    def on(self, ids: torch.Tensor, batch_size: int | None = None, progress: bool = False) -> "LayerRunner":
        """The same checkpoint and plan over other token ids, with nothing run yet (e.g. a search subset, whose
        many short runs show the search's progress bar rather than one bar each)."""
        other = copy.copy(self)
        other.progress = progress
        other.ids = ids
        other.batches = [batch.to(self.device) for batch in ids.split(batch_size or self.batch_size)]
        other.state = RunState()
        return other

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor of the planned model, in the compute dtype on the compute device."""
        return self.plan.tensor(name, self.reader.get).to(self.device, self.dtype)

    def _layer(self, index: int, kv_source: list[int]) -> SurgeryDecoderLayer:
        """Layer `index` as `kv_source` plans it, with only the tensors it holds read from the checkpoint."""
        config = copy.copy(self.config)
        config.kv_source = list(kv_source)
        with torch.device("meta"):
            layer = SurgeryDecoderLayer(config, index)
        prefix = f"model.layers.{index}."
        weights = {name: self.tensor(prefix + name) for name in layer.state_dict()}
        layer.load_state_dict(weights, strict=True, assign=True)
        return layer.eval()

    @torch.no_grad()
    def embed(self) -> list[torch.Tensor]:
        weight = self.tensor("model.embed_tokens.weight")
        return [scale_embeddings(F.embedding(batch, weight), self.config) for batch in self.batches]

    @torch.no_grad()
    def run(self, kv_source: list[int], start: int = 0, commit: bool = True, projections: dict | None = None,
            policies: list | None = None, record: bool = True,
            visit: Callable[[int, list[KV]], None] | None = None,
            inspect: Callable[[int, SurgeryDecoderLayer, list[torch.Tensor]], None] | None = None) -> RunState:
        """Run layers `start`.. under `kv_source`, from the kept inputs of layer `start` (the embeddings at 0).

        projections: KV projections by owner layer, in place of the planned ones (a rank-search trial).
        policies: one KV budget policy per batch, scoring every owner layer (ZigZagKV's calibration).
        record: keep every layer's inputs and K/V (for later trials); else only the K/V later layers read.
        visit: called with (layer, that layer's post-RoPE K/V per batch) for every owner layer.
        inspect: called with (layer, the loaded layer module, its input hidden states per batch) before it runs.
        """
        state = RunState(inputs=dict(self.state.inputs), kv=dict(self.state.kv))
        hidden = self.embed() if start == 0 else self.state.inputs[start]
        read_later = {source for layer, source in enumerate(kv_source) if source != layer}
        owned: dict[int, object] = {}  # the planned projections of the owner layers run so far
        layers = range(start, self.config.num_hidden_layers)
        for index in tqdm(layers, desc="calibrating layers", unit="layer", leave=False, disable=not self.progress):
            if record:
                state.inputs[index] = hidden
            layer = self._layer(index, kv_source)
            if inspect is not None:
                inspect(index, layer, hidden)
            if kv_source[index] == index:
                owned[index] = getattr(layer.self_attn, "kv_projection", None)
            chosen = [(projections or {}).get(i, owned.get(i)) for i in range(self.config.num_hidden_layers)]
            outputs, kv = [], []
            for batch, states in enumerate(hidden):
                cache = SurgeryCache(kv_source)
                source = kv_source[index]
                if source != index:  # a sharing layer reads what its source layer cached for this batch
                    keys, values = state.kv[source][batch]
                    cache.layers[source].update(keys, values, source)
                positions = torch.arange(states.shape[1], device=self.device)[None]
                context = LayerContext(cache=cache, positions=positions, padding=None, projections=chosen,
                                       policy=policies[batch] if policies else None)
                outputs.append(layer(states, self.rotary(states, positions), context))
                if source == index:
                    kv.append((cache.layers[index].keys, cache.layers[index].values))
            if kv and visit is not None:
                visit(index, kv)
            if kv and (record or index in read_later):
                state.kv[index] = kv
            hidden = outputs
            del layer, outputs, kv
            release_freed_memory()
        norm = rms_norm(self.config, self.config.hidden_size)
        norm.weight.data = self.tensor("model.norm.weight")
        state.final = [norm(states) for states in hidden]
        if commit:
            self.commit(state, kv_source)
        return state

    def commit(self, state: RunState, kv_source: list[int]) -> None:
        self.state, self.kv_source = state, list(kv_source)

    @torch.no_grad()
    def log_probs(self, final: list[torch.Tensor]) -> list[torch.Tensor]:
        """Next-token log-probabilities (float32) from final-norm hidden states; the head is loaded once."""
        if self._head is None:
            tied = self.config.tie_word_embeddings or "lm_head.weight" not in self.reader.weight_map
            self._head = self.tensor("model.embed_tokens.weight" if tied else "lm_head.weight")
        cap = self.config.final_logit_softcapping
        return [soft_cap((states @ self._head.T).float(), cap).log_softmax(-1) for states in final]
