"""The one KV cache of the surgery decoder.

It stores K/V only for the layers that own them. A sharing layer (KVSharer) gets a placeholder slot that holds
nothing and reads its source layer's tensors instead, a PoD layer keeps the keys of its borrowing heads only
for proximal tokens, a gated layer keeps per head only the tokens its gate kept, and a routed layer only the
tokens it routed, so the memory a plan saves is absent from the cache's tensors, not masked. Shipped flat inside
every checkpoint: imports torch and public transformers API only.
"""

import torch
from transformers.cache_utils import Cache

from .attention_surgery import KVView, ViewSkip
from .gate_surgery import GatedKVLayer
from .kvlayer_surgery import SharedKVSlot, SurgeryKVLayer
from .pod_surgery import PodKVLayer
from .routing_surgery import RoutedKVLayer


class SurgeryCache(Cache):
    """A `transformers.Cache` laid out by the plan: one K/V layer per K/V-owning layer (a PoD layer where some of
    its heads borrow keys, a `GatedKVLayer` where an Attention-Gate evicts), a `SharedKVSlot` for layers that read
    another layer's cache.

    slack: extra recent keys PoD layers keep past their window until the next forward (a scoring probe that is
    dropped again, as in `compress_context`, must not shorten the window).
    distant_skip: PoD's optional skip of the distant view, with the counts of what it skipped.
    """

    def __init__(self, kv_source: list[int], key_source: list[list[int]] | None = None, sinks: int = 0,
                 recent: int = 0, distant_skip: float | None = None, gated_heads: int | None = None,
                 routed: list[int] | None = None):
        self.kv_source = list(kv_source)
        self.key_source = key_source
        self.slack = 0
        self.distant_skip = ViewSkip(distant_skip) if distant_skip is not None else None
        layers = []
        for layer, source in enumerate(kv_source):
            borrowed = {} if key_source is None else {h: s for h, s in enumerate(key_source[layer]) if s != layer}
            if source != layer:
                layers.append(SharedKVSlot(source))
            elif borrowed:
                layers.append(PodKVLayer(len(key_source[layer]), borrowed, sinks, recent))
            elif routed and layer in routed:
                layers.append(RoutedKVLayer())
            elif gated_heads:
                layers.append(GatedKVLayer(gated_heads))
            else:
                layers.append(SurgeryKVLayer())
        super().__init__(layers=layers)

    @classmethod
    def for_config(cls, config) -> "SurgeryCache":
        gated = config.num_key_value_heads if config.kv_gate_heads else None
        return cls(config.kv_source, config.kv_key_source, config.kv_sink_tokens, config.kv_recent_tokens,
                   config.kv_distant_skip, gated, config.mod_layers)

    def views(self, layer_idx: int, padding: torch.Tensor | None = None, projection=None) -> list[KVView]:
        """What `layer_idx` attends to, already updated for this step: its own or its source layer's cache."""
        owner_idx = self.kv_source[layer_idx]
        owner = self.layers[owner_idx]
        if owner.values is None or not owner.is_initialized:
            raise RuntimeError(f"layer {layer_idx} reads layer {owner_idx}, which has not run yet")
        return owner.views(owner_idx, padding, projection, self)

    def keep_top(self, layer_idx: int, scores: torch.Tensor, counts: list[int], window: int) -> torch.Tensor:
        layer = self.layers[layer_idx]
        follow = {head: self.layers[source].selection for head, source in getattr(layer, "borrowed", {}).items()}
        return layer.keep_top(scores, counts, window, follow)

    def drop_last(self, count: int) -> None:
        for layer in self.layers:
            if isinstance(layer, (SurgeryKVLayer, GatedKVLayer, RoutedKVLayer)):
                layer.drop_last(count)

    def settle(self) -> None:
        for layer in self.layers:
            layer.settle(self.slack)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[self.kv_source[layer_idx]].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def kv_bytes(self) -> int:
        """Bytes held by the cache's K/V tensors, counted from the tensors themselves."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.stored_tensors())

    def kept_fraction(self) -> float:
        """Of the (token, KV head) pairs each K/V-owning layer has seen, the share it still holds (eviction, gates)."""
        held, seen = 0, 0
        for layer in self.layers:
            if not isinstance(layer, SharedKVSlot) and layer.values is not None:
                layer_held, layer_seen = layer.held_tokens()
                held, seen = held + layer_held, seen + layer_seen
        return held / seen if seen else 1.0

    def kv_bytes_per_token(self) -> float:
        """Measured K/V bytes per token seen (batch × sequence): evicted, shared or projected parts are absent."""
        batch = next((layer.values.shape[0] for layer in self.layers if layer.values is not None), 0)
        if batch == 0 or self.get_seq_length() == 0:
            return 0.0
        return self.kv_bytes() / (batch * self.get_seq_length())

__all__ = ["SurgeryCache", "SurgeryKVLayer", "SharedKVSlot", "PodKVLayer", "GatedKVLayer", "RoutedKVLayer"]
