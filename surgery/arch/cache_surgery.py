"""The one KV cache of the surgery decoder.

It stores K/V only for the layers that own them, each in a store chosen by the plan: the recipe runtimes the model
runs are asked in order (`Runtime.cache_layer`: a PoD layer keeps the keys of its borrowing heads only for proximal
tokens, a gated layer keeps per head only the tokens its gate kept, a routed layer only the tokens it routed), and a
layer none of them claims gets the plain store. A sharing layer (KVSharer) gets an empty slot and reads its source
layer's tensors. So the memory a plan saves is absent from the cache's tensors, not masked. Every store is a
`KVStore` (kvlayer_surgery.py). Shipped flat inside every checkpoint: imports torch and public transformers API only.
"""

import torch
from transformers.cache_utils import Cache

from .attention_surgery import KVView
from .kvlayer_surgery import SharedKVSlot, SurgeryKVLayer


class SurgeryCache(Cache):
    """A `transformers.Cache` laid out by the plan: one store per K/V-owning layer, a `SharedKVSlot` for layers
    that read another layer's cache.

    slack: extra recent keys PoD layers keep past their window until the next forward (a scoring probe that is
    dropped again, as in `compress_context`, must not shorten the window).
    view_skip: a skip of the last view for rows the earlier views already hold (PoD's `DistantSkip`), with its counts.
    """

    def __init__(self, kv_source: list[int], stores: dict[int, object] | None = None,
                 windows: dict[int, int] | None = None):
        self.kv_source = list(kv_source)
        self.slack = 0
        self.view_skip = None
        stores, windows = stores or {}, windows or {}
        layers = [SharedKVSlot(source) if source != layer else stores.get(layer) or SurgeryKVLayer(windows.get(layer))
                  for layer, source in enumerate(kv_source)]
        super().__init__(layers=layers)

    @classmethod
    def for_config(cls, config, runtimes=()) -> "SurgeryCache":
        """The cache of a plan: each owner layer's store is the first that a runtime offers, else the plain one,
        which holds only the window of a sliding-window layer."""
        stores = {}
        for layer in config.owner_layers:
            store = next((s for s in (r.cache_layer(config, layer) for r in runtimes) if s is not None), None)
            if store is not None:
                stores[layer] = store
        windows = {layer: config.sliding_window for layer in config.owner_layers if config.is_sliding(layer)}
        cache = cls(config.kv_source, stores, windows)
        for runtime in runtimes:
            runtime.prepare_cache(cache, config)
        return cache

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

__all__ = ["SurgeryCache"]
