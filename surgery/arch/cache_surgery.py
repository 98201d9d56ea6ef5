"""The one KV cache of the surgery decoder.

It stores K/V only for the layers that own them. A sharing layer (KVSharer) gets a placeholder slot that holds
nothing and reads its source layer's tensors instead, so the memory a plan saves is absent from the cache's
tensors, not masked. Shipped flat inside every checkpoint: imports torch and public transformers API only.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SharedKVSlot:
    """Placeholder for a layer that reads another layer's K/V: stores nothing, every cache operation is a no-op."""

    is_initialized = True
    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, source_layer: int):
        self.source_layer = source_layer
        self.keys = None
        self.values = None

    def __repr__(self) -> str:
        return f"SharedKVSlot(source_layer={self.source_layer})"

    def update(self, *args, **kwargs):
        raise RuntimeError("a sharing layer computes no K/V and must not write to the cache")

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None: ...
    def crop(self, tokens_to_remove: int) -> None: ...
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices: torch.Tensor) -> None: ...
    def offload(self) -> None: ...
    def prefetch(self) -> None: ...


class SurgeryCache(Cache):
    """A `transformers.Cache` laid out by the plan: one `DynamicLayer` per K/V-owning layer, a `SharedKVSlot` elsewhere."""

    def __init__(self, kv_source: list[int]):
        self.kv_source = list(kv_source)
        layers = [DynamicLayer() if source == layer else SharedKVSlot(source) for layer, source in enumerate(kv_source)]
        super().__init__(layers=layers)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V that `layer_idx` attends to: its own, or its source layer's, already updated for this step."""
        owner = self.layers[self.kv_source[layer_idx]]
        if owner.keys is None or not owner.is_initialized:
            raise RuntimeError(f"layer {layer_idx} reads layer {self.kv_source[layer_idx]}, which has not run yet")
        return owner.keys, owner.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[self.kv_source[layer_idx]].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def kv_bytes(self) -> int:
        """Bytes held by the cache's K/V tensors, counted from the tensors themselves."""
        total = 0
        for layer in self.layers:
            for tensor in (layer.keys, layer.values):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def kv_bytes_per_token(self) -> float:
        """Measured K/V bytes divided by the number of cached token positions (batch × sequence)."""
        owner = self.layers[self.kv_source[0]]
        if owner.keys is None or owner.keys.numel() == 0:
            return 0.0
        tokens = owner.keys.shape[0] * owner.keys.shape[-2]
        return self.kv_bytes() / tokens


__all__ = ["SurgeryCache", "SharedKVSlot"]
