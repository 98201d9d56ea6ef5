"""Calibration one decoder layer at a time: memory scales with one layer, not with the model.

The runner embeds the calibration samples once, then walks the decoder: it loads one layer's tensors from the
lazy checkpoint (memory-mapped safetensors), runs every sample batch through it, and frees it. It keeps the hidden
states entering every layer and the post-RoPE K/V of every owner layer, so a search trial that changes layer i
re-runs only layers i.. and reads the K/V of earlier layers from what it kept. A trial is committed only when the
recipe accepts it.

Memory: one layer's weights, the embeddings or the final norm when they are used, and the kept activations
(samples × tokens × hidden size per layer boundary, plus the K/V of the owner layers).
"""

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .arch.cache_surgery import SurgeryCache
from .arch.configuration_surgery import SurgeryConfig
from .arch.modeling_surgery import LayerContext, SurgeryDecoderLayer, SurgeryRMSNorm, SurgeryRotaryEmbedding
from .tensor_io import LazyCheckpoint, release_freed_memory


@dataclass
class RunState:
    """What a run leaves behind: hidden states entering each layer and owner layers' K/V, per sample batch."""

    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    final: list[torch.Tensor] = field(default_factory=list)  # after the final norm


class LayerRunner:
    """Runs calibration token batches through the source checkpoint's decoder, one layer at a time."""

    def __init__(self, folder: Path, config: SurgeryConfig, ids: torch.Tensor, batch_size: int,
                 dtype: torch.dtype = torch.float32, progress: bool = False, device: str = "cpu"):
        self.reader = LazyCheckpoint(folder)
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = "sdpa"  # the calibration path is PyTorch's, on any device
        self.device = torch.device(device)
        self.batches = [batch.to(self.device) for batch in ids.split(batch_size)]
        self.dtype = dtype
        self.progress = progress
        self.rotary = SurgeryRotaryEmbedding(self.config).to(self.device)
        self.state = RunState()
        self.kv_source = list(range(config.num_hidden_layers))

    def _layer(self, index: int, kv_source: list[int]) -> SurgeryDecoderLayer:
        """Layer `index` as `kv_source` plans it, with only the tensors it holds read from the checkpoint."""
        config = copy.copy(self.config)
        config.kv_source = list(kv_source)
        with torch.device("meta"):
            layer = SurgeryDecoderLayer(config, index)
        prefix = f"model.layers.{index}."
        weights = {name: self.reader.get(prefix + name).to(self.device, self.dtype) for name in layer.state_dict()}
        layer.load_state_dict(weights, strict=True, assign=True)
        return layer.eval()

    @torch.no_grad()
    def embed(self) -> list[torch.Tensor]:
        weight = self.reader.get("model.embed_tokens.weight").to(self.device, self.dtype)
        return [F.embedding(batch, weight) for batch in self.batches]

    @torch.no_grad()
    def run(self, kv_source: list[int], start: int = 0, commit: bool = True) -> RunState:
        """Run layers `start`.. under `kv_source`, from the kept inputs of layer `start` (the embeddings at 0)."""
        state = RunState(inputs=dict(self.state.inputs), kv=dict(self.state.kv))
        hidden = self.embed() if start == 0 else self.state.inputs[start]
        layers = range(start, self.config.num_hidden_layers)
        for index in tqdm(layers, desc="calibrating layers", unit="layer", leave=False, disable=not self.progress):
            state.inputs[index] = hidden
            layer = self._layer(index, kv_source)
            outputs, kv = [], []
            for batch, states in enumerate(hidden):
                cache = SurgeryCache(kv_source)
                source = kv_source[index]
                if source != index:  # a sharing layer reads what its source layer cached for this batch
                    keys, values = state.kv[source][batch]
                    cache.layers[source].update(keys, values, source)
                positions = torch.arange(states.shape[1], device=self.device)[None]
                context = LayerContext(cache=cache, positions=positions, padding=None,
                                       projections=[None] * self.config.num_hidden_layers)
                outputs.append(layer(states, self.rotary(states, positions), context))
                if source == index:
                    kv.append((cache.layers[index].keys, cache.layers[index].values))
            if kv:
                state.kv[index] = kv
            hidden = outputs
            del layer
            release_freed_memory()
        norm = SurgeryRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = self.reader.get("model.norm.weight").to(self.device, self.dtype)
        state.final = [norm(states) for states in hidden]
        if commit:
            self.commit(state, kv_source)
        return state

    def commit(self, state: RunState, kv_source: list[int]) -> None:
        self.state, self.kv_source = state, list(kv_source)
