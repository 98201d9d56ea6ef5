"""The per-layer stores of the surgery cache: what every store is (`KVStore`), a layer's own K/V (dense, or compacted
after eviction), and the empty slot of a layer that reads another layer's cache. A recipe that stores K/V its own
way adds a `KVStore` in its runtime module. Shipped flat inside every checkpoint: imports torch and public
transformers API only.
"""

from abc import ABC, abstractmethod

import torch
from transformers.cache_utils import DynamicLayer

from .attention_surgery import KVView


class KVStore(ABC):
    """What the cache and the attention ask of every per-layer store."""

    @abstractmethod
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append this forward's K/V (and whatever the recipe passes along: widths, retention, route)."""

    @abstractmethod
    def views(self, layer_idx: int, padding: torch.Tensor | None, projection, cache) -> list[KVView]:
        """What the layer's queries attend to, already updated for this step."""

    @abstractmethod
    def get_seq_length(self) -> int:
        """Tokens this layer has seen (held or not)."""

    @abstractmethod
    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor held for the tokens, so the cache's bytes are measured, not derived."""

    @abstractmethod
    def held_tokens(self) -> tuple[int, int]:
        """(token, KV head) pairs held and seen."""

    @abstractmethod
    def drop_last(self, count: int) -> None:
        """Forget the `count` newest tokens (a scoring probe, or a recomputed layer under checkpointing)."""

    def settle(self, slack: int) -> None:
        """After a forward that keeps its cache: drop what the plan keeps only while that forward runs."""

    def keep_top(self, scores: torch.Tensor, counts: list[int], window: int, follow: dict | None = None) -> torch.Tensor:
        """Evict down to `counts` tokens per sequence by `scores` (token-budget policies)."""
        raise NotImplementedError(f"{type(self).__name__} does not evict by score")


class PlainCacheLayer(KVStore):
    """The attributes transformers reads on a cache layer, for our layers that are not one of its layer types."""

    is_initialized = True
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def offload(self) -> None: ...
    def prefetch(self) -> None: ...

    def _each_batch(self, fn) -> None:
        """Apply `fn` to every tensor this layer holds whose first dim is the batch (none here)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each_batch(lambda t: t[indices])


class SharedKVSlot(PlainCacheLayer):
    """Placeholder for a layer that reads another layer's K/V: stores nothing, every cache operation is a no-op."""

    is_croppable = True

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

    def stored_tensors(self) -> tuple:
        return ()

    def held_tokens(self) -> tuple[int, int]:
        return 0, 0

    def views(self, layer_idx, padding, projection, cache) -> list[KVView]:
        raise RuntimeError("a sharing layer's views are its source layer's")

    def drop_last(self, count: int) -> None: ...
    def settle(self, slack: int) -> None: ...
    def reset(self) -> None: ...
    def crop(self, tokens_to_remove: int) -> None: ...


class SurgeryKVLayer(DynamicLayer, KVStore):
    """A layer's own K/V. Dense until a budget policy evicts tokens; then each (sequence, KV head) keeps its own
    slots, gathered into compact tensors, with `valid` marking real slots (sequences of a batch may keep different
    counts) and `positions` the original token position of each slot (kept keys already carry their RoPE).

    A sliding-window layer (`window`) holds, between forwards, only the last window − 1 tokens, as transformers'
    sliding cache layers do: the next token's query reaches no further back. `offset` is then the position of the
    first slot. (Budget policies and the recipes that keep tokens their own way act on global layers only.)

    Keys of a MatryoshkaKV layer are packed (batch, 1, seq, Σ rank); `widths` then says how wide each head's block is.
    """

    def __init__(self, window: int | None = None):
        super().__init__()
        self.window = window
        self.offset = 0
        self.seen = 0
        self.valid: torch.Tensor | None = None  # (batch, kv_heads, slots) bool
        self.positions: torch.Tensor | None = None  # (batch, kv_heads, slots) long
        self.widths: tuple[list[int], list[int]] | None = None
        self.selection: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, widths=None, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        new = key_states.shape[-2]
        self.seen += new
        self.widths = widths
        if self.valid is not None:
            batch, heads = self.valid.shape[:2]
            self.valid = torch.cat([self.valid, self.valid.new_ones(batch, heads, new)], dim=-1)
            fresh = torch.arange(self.seen - new, self.seen, device=self.positions.device).expand(batch, heads, new)
            self.positions = torch.cat([self.positions, fresh], dim=-1)
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def keep_top(self, scores: torch.Tensor, counts: list[int], window: int, follow: dict | None = None) -> torch.Tensor:
        """Keep, per (sequence, KV head), the last `window` tokens and the best-scoring earlier ones, `counts[b]`
        slots in all; gather them into compact tensors. `scores` (batch, kv_heads, prefix) rank the prefix
        positions; returns which prefix positions are still kept, same shape. The choice is remembered in
        `selection`, for PoD layers that keep what their group's bottom layer keeps."""
        self.selection = self.select(scores, counts, window)
        return self.keep_slots(*self.selection, scores.shape[-1])

    def select(self, scores: torch.Tensor, counts: list[int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, chosen), both (batch, kv_heads, width): the slots to keep, in slot order, and which are real."""
        batch, kv_heads, prefix = scores.shape
        slots = self.values.shape[-2]
        device = self.values.device
        positions = self.slot_positions(batch, kv_heads)
        valid = self.valid if self.valid is not None else torch.ones(batch, kv_heads, slots, dtype=torch.bool, device=device)
        in_prefix = positions < prefix
        slot_scores = scores.gather(-1, positions.clamp(max=max(prefix - 1, 0))) if prefix else torch.zeros_like(positions, dtype=scores.dtype)
        slot_scores = torch.where(in_prefix, slot_scores, torch.full_like(slot_scores, float("inf")))
        slot_scores = slot_scores.masked_fill(~valid, float("-inf"))
        width = min(max(counts), slots)
        top = slot_scores.topk(width, dim=-1)
        order = top.indices.sort(dim=-1)
        ranks = torch.arange(width, device=device)
        limit = torch.tensor(counts, device=device)[:, None, None]
        chosen = (torch.gather(top.values, -1, order.indices) > float("-inf"))
        chosen &= torch.gather((ranks < limit).expand(batch, kv_heads, width), -1, order.indices)
        return order.values, chosen

    def slot_positions(self, batch: int, kv_heads: int) -> torch.Tensor:
        """(batch, kv_heads, slots): the token position each slot holds."""
        if self.positions is not None:
            return self.positions
        slots = self.values.shape[-2]
        return torch.arange(self.offset, self.offset + slots, device=self.values.device).expand(batch, kv_heads, slots)

    def settle(self, slack: int) -> None:
        """A sliding-window layer forgets the tokens no later query can reach (keeping `slack` more for a probe that
        is dropped again). A long prefill's tail is copied out, so the rest of the prompt's K/V is freed now."""
        if self.window is None or self.values is None or self.valid is not None:
            return
        excess = self.values.shape[-2] - (self.window - 1 + slack)
        if excess <= 0:
            return
        trim = (lambda t: t[..., excess:, :]) if excess == 1 else (lambda t: t[..., excess:, :].clone())
        self.keys, self.values = trim(self.keys), trim(self.values)
        self.offset += excess

    def keep_slots(self, index: torch.Tensor, chosen: torch.Tensor, prefix: int) -> torch.Tensor:
        """Gather the chosen slots into compact tensors; returns which prefix positions are kept per head."""
        batch, kv_heads = index.shape[:2]
        positions = self.slot_positions(batch, kv_heads)
        self.keys = self._gather(self.keys, self.key_index(index), 0)
        self.values = self._gather(self.values, index, 1)
        self.positions = positions.gather(-1, index)
        self.valid = chosen
        kept = torch.zeros(batch, kv_heads, prefix + 1, dtype=torch.bool, device=index.device)
        kept.scatter_(-1, torch.where(chosen & (self.positions < prefix), self.positions, prefix), True)
        return kept[..., :prefix]

    def key_index(self, index: torch.Tensor) -> torch.Tensor:
        """The rows of a slot index that apply to the stored keys (every head here; PoD keeps some heads apart)."""
        return index

    def full_keys(self, head: int) -> torch.Tensor:
        """(batch, slots, head_dim): one head's keys for every slot, which PoD layers above may borrow."""
        return self.keys[:, head]

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors this layer holds for its tokens, for measuring the cache's bytes."""
        return tuple(t for t in (self.keys, self.values) if isinstance(t, torch.Tensor))

    def held_tokens(self) -> tuple[int, int]:
        """(token, KV head) pairs held and seen (a sliding layer's tokens count from its window's start)."""
        heads = len(self.widths[1]) if self.widths is not None else self.values.shape[1]
        seen = self.values.shape[0] * heads * (self.seen - self.offset)
        return (int(self.valid.sum()) if self.valid is not None else seen), seen

    def views(self, layer_idx: int, padding: torch.Tensor | None, projection, cache) -> list[KVView]:
        """What this layer's queries attend to: its K/V with original positions and kept slots after eviction,
        else the padding mask (batch, slots) of a dense cache."""
        if self.valid is not None:
            return [KVView(self.keys, self.values, self.positions, self.valid, projection, ("kept", layer_idx))]
        slots = self.keys.shape[-2]
        valid = None if padding is None else padding[:, None, self.offset : self.offset + slots]
        if self.offset == 0:
            return [KVView(self.keys, self.values, None, valid, projection, ("dense",))]
        positions = torch.arange(self.offset, self.offset + slots, device=self.keys.device)[None, None]
        return [KVView(self.keys, self.values, positions, valid, projection, ("window", self.offset))]

    def _gather(self, tensor: torch.Tensor, index: torch.Tensor, side: int) -> torch.Tensor:
        """Select slots per KV head; a packed (MatryoshkaKV) tensor is gathered head block by head block."""
        if self.widths is None:
            return tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1]))
        blocks, offset = [], 0
        for head, width in enumerate(self.widths[side]):
            block = tensor[:, 0, :, offset : offset + width]
            blocks.append(block.gather(1, index[:, head, :, None].expand(-1, -1, width)))
            offset += width
        return torch.cat(blocks, dim=-1).unsqueeze(1)

    def drop_last(self, count: int) -> None:
        """Forget the `count` newest tokens (a scoring probe), which sit in the last slots of every head."""
        self.keys, self.values = self.keys[..., :-count, :], self.values[..., :-count, :]
        if self.valid is not None:
            self.valid, self.positions = self.valid[..., :-count], self.positions[..., :-count]
        self.seen -= count

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid, self.positions = self.valid[indices], self.positions[indices]

    def crop(self, tokens_to_remove: int) -> None:
        if self.valid is not None or self.offset:
            raise NotImplementedError("cannot crop a cache after token eviction or past a sliding window")
        super().crop(tokens_to_remove)
        self.seen = self.keys.shape[-2] if self.keys is not None and self.keys.numel() else 0

    def reset(self) -> None:
        super().reset()
        self.seen, self.offset, self.valid, self.positions = 0, 0, None, None


__all__ = ["PlainCacheLayer", "SharedKVSlot", "SurgeryKVLayer"]
