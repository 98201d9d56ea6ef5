"""PoD (Ma et al., arXiv 2412.02252) in the cache: a layer whose KV heads borrow keys for distant tokens.

Each KV head of a PoD layer either keeps all its keys (it is the bottom of its group) or *borrows*: it keeps its
own keys only for the proximal tokens, the first `sinks` real tokens and the last `recent` ones, and reads the
keys of its group's bottom layer for every other token, paired with its own values. Every head keeps all its
values. So the layer attends through two views that merge exactly by log-sum-exp (one softmax over both):

- near: own keys and values of the proximal tokens (band: proximal);
- far: the bottom layers' keys with this layer's values, for every slot (band: distant).

The borrowed heads' own keys live in a small edge store with fixed columns: `sinks` columns for the positions
first, first + 1, ... of each sequence, then one column per recent position, the newest last. A forward appends
every new token's key; `settle` (after a forward that keeps its cache) copies the sinks into their columns and
drops the recent columns older than the window. Which edge columns hold a token the layer still has is looked
up in the layer's slots, so token eviction (one kept set per group, chosen by the bottom layer) needs nothing
more here.

Shipped flat inside every checkpoint: imports torch only.
"""

from dataclasses import dataclass

import torch

from .attention_surgery import KVView, Queries, ViewRule, allowed_slots
from .kvlayer_surgery import SurgeryKVLayer
from .runtime_surgery import Runtime


@dataclass
class Band(ViewRule):
    """Which earlier tokens a view's slots serve, by distance from each query. Proximal: the first `sinks` real
    tokens of the sequence and the last `recent` tokens up to the query itself; distant: every other one.

    first: (batch,) position of each sequence's first real token (left padding); None: position 0.
    """

    sinks: int
    recent: int
    distant: bool
    first: torch.Tensor | None = None

    @property
    def key(self) -> tuple:
        return ("band", self.sinks, self.recent, self.distant)

    def allows(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        offset = key_positions if self.first is None else key_positions - self.first[:, None, None, None]
        proximal = (offset < self.sinks) | (key_positions > query_positions - self.recent)
        return ~proximal if self.distant else proximal

    def key_ranges(self, first_query: int, last_query: int) -> list[tuple[int, int]]:
        """Distant keys end `recent` before the last query; proximal keys are the sinks (after the first real token
        of any sequence) and the recent window of the block."""
        if self.distant:
            return [(-2**62, last_query - self.recent)]
        last_first = 0 if self.first is None else int(self.first.max())
        return [(-2**62, last_first + self.sinks - 1), (first_query - self.recent + 1, last_query)]

    def kernel_arguments(self) -> dict:
        return {"band": self}


@dataclass
class DistantSkip:
    """PoD's optional skip (the paper's τ): the last of several views (the distant one) is dropped for the query rows (per head) whose mass in the
    views before it, g = exp(lse_before − lse_all), is at least `threshold`; those rows attend over the earlier
    views alone. Counts what it does, so a benchmark can report the FLOPs the rule saves.

    g is exact, so the last view's scores are still computed; what a skipped row saves is the probability-times-
    values product over that view's slots (2·d multiply-adds per slot, half of the view's attention FLOPs).
    """

    threshold: float
    rows: int = 0  # (batch, head, query) rows that had a view to skip
    skipped: int = 0
    attention_flops: float = 0.0  # 4·d per (row, allowed slot), over every view of every layer
    skipped_flops: float = 0.0  # 2·d per (skipped row, allowed slot of the dropped view)

    def count(self, queries: Queries, views: list[KVView], window: int | None) -> list[torch.Tensor]:
        """Allowed slots per (batch, head, query) row of each view, and the FLOPs they cost."""
        heads, dim = queries.states.shape[1], queries.states.shape[-1]
        counts = []
        for view in views:
            allowed = allowed_slots(queries.positions, view, window).sum(-1)
            counts.append(allowed.expand(queries.states.shape[0], -1, -1).repeat_interleave(
                heads // allowed.shape[1], dim=1) if allowed.shape[1] != heads else allowed)
            self.attention_flops += 4.0 * dim * float(counts[-1].sum())
        return counts

    def apply(self, before: tuple[torch.Tensor, torch.Tensor], last: tuple[torch.Tensor, torch.Tensor],
              slots: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`last` with the rows to skip emptied (lse −inf, output 0), so merging it leaves them as they were."""
        (_, lse_before), (out, lse) = before, last
        mass_before = torch.exp(lse_before - torch.logaddexp(lse_before, lse))
        skip = (mass_before >= self.threshold) & (slots > 0)
        self.rows += int((slots > 0).sum())
        self.skipped += int(skip.sum())
        self.skipped_flops += 2.0 * dim * float(slots[skip].sum())
        out = out.masked_fill(skip.transpose(1, 2)[..., None], 0.0)
        return out, lse.masked_fill(skip, float("-inf"))


class PodKVLayer(SurgeryKVLayer):
    """`keys` holds the keys of the heads this layer keeps whole (`own_heads`), `values` those of every head, and
    `edge_keys` the proximal keys of the borrowing heads: (batch, borrowing heads, sinks + recent columns, d)."""

    def __init__(self, kv_heads: int, borrowed: dict[int, int], sinks: int, recent: int):
        super().__init__()
        self.kv_heads = kv_heads
        self.borrowed = dict(borrowed)  # head -> the layer whose keys it reads for distant tokens
        self.own_heads = [h for h in range(kv_heads) if h not in self.borrowed]
        self.borrowing_heads = sorted(self.borrowed)
        self.sinks, self.recent = sinks, recent
        self.edge_keys: torch.Tensor | None = None
        self.span = 0  # recent columns held: positions seen - span .. seen - 1
        self.settled = 0  # tokens seen at the last settle: sink columns below it are filled
        self.first: torch.Tensor | None = None  # (batch,) first real position of each sequence

    def update(self, key_states, value_states, *args, **kwargs):
        own = key_states[:, self.own_heads]
        borrowing = key_states[:, self.borrowing_heads]
        keys, values = super().update(own, value_states, *args, **kwargs)
        if self.edge_keys is None:
            batch, _, _, dim = borrowing.shape
            self.edge_keys = borrowing.new_zeros(batch, len(self.borrowing_heads), self.sinks, dim)
        self.edge_keys = torch.cat([self.edge_keys, borrowing], dim=2)
        self.span += borrowing.shape[2]
        return keys, values

    def key_index(self, index: torch.Tensor) -> torch.Tensor:
        return index[:, self.own_heads]

    def full_keys(self, head: int) -> torch.Tensor:
        if head in self.borrowed:
            raise RuntimeError(f"head {head} of this layer borrows its distant keys and cannot lend them")
        return self.keys[:, self.own_heads.index(head)]

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        edge = (self.edge_keys,) if self.edge_keys is not None else ()
        return super().stored_tensors() + edge

    # where the edge columns are
    def _first(self, batch: int, device) -> torch.Tensor:
        return self.first if self.first is not None else torch.zeros(batch, dtype=torch.long, device=device)

    def edge_positions(self) -> torch.Tensor:
        """(batch, columns): the token position each edge column stands for."""
        batch, device = self.values.shape[0], self.values.device
        sinks = self._first(batch, device)[:, None] + torch.arange(self.sinks, device=device)
        recent = torch.arange(self.seen - self.span, self.seen, device=device).expand(batch, self.span)
        return torch.cat([sinks, recent], dim=-1)

    def edge_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, held), both (batch, kv_heads, columns): the layer slot of each column's token, and whether the
        column holds a token the layer has (real, not padding, not a duplicate of a sink column, not evicted)."""
        batch, device = self.values.shape[0], self.values.device
        positions = self.edge_positions()
        offset = positions - self._first(batch, device)[:, None]
        is_sink = torch.arange(positions.shape[1], device=device) < self.sinks
        held = (offset >= 0) & (positions < self.seen)
        held &= torch.where(is_sink, positions < self.settled, ~((offset < self.sinks) & (positions < self.settled)))
        held = held[:, None].expand(batch, self.kv_heads, -1)
        positions = positions[:, None].expand(batch, self.kv_heads, -1)
        if self.positions is None:  # dense: slot i holds token i
            return positions.clamp(0, max(self.seen - 1, 0)), held
        slot = torch.searchsorted(self.positions.contiguous(), positions.contiguous()).clamp(max=self.positions.shape[-1] - 1)
        held = held & (self.positions.gather(-1, slot) == positions) & self.valid.gather(-1, slot)
        return slot, held

    def views(self, layer_idx: int, padding: torch.Tensor | None, projection, cache) -> list[KVView]:
        batch = self.values.shape[0]
        if self.first is None and padding is not None:  # left padding: a sequence starts at its first real token
            self.first = padding[:, : self.seen].long().argmax(-1)
        first = self._first(batch, self.values.device)
        slot, held = self.edge_slots()
        dim = self.values.shape[-1]
        own_near = self.keys.gather(2, slot[:, self.own_heads, :, None].expand(-1, -1, -1, dim))
        near_keys = self._by_head(own_near, self.edge_keys)
        near_values = self.values.gather(2, slot[..., None].expand(-1, -1, -1, dim))
        near_layout = ("pod-near",) if self.positions is None else ("pod-near", layer_idx)  # eviction: per group
        near = KVView(near_keys, near_values, self.edge_positions()[:, None], held, layout=near_layout,
                      rules=(Band(self.sinks, self.recent, distant=False, first=first),))
        far_keys = self._far_keys(cache)
        if self.valid is not None:
            far = KVView(far_keys, self.values, self.positions, self.valid, layout=("kept", layer_idx))
        else:
            far = KVView(far_keys, self.values, None, None if padding is None else padding[:, None, : self.seen],
                         layout=("dense",))
        far.rules = (Band(self.sinks, self.recent, distant=True, first=first),)
        return [near, far]

    def _far_keys(self, cache) -> torch.Tensor:
        """Every head's keys for distant tokens: the lending layer's tensor as it is when all heads borrow from one
        layer that keeps them all, else assembled head by head (a transient copy of one layer's keys)."""
        lenders = set(self.borrowed.values())
        if not self.own_heads and len(lenders) == 1:
            lender = cache.layers[lenders.pop()]
            if not isinstance(lender, PodKVLayer):
                return lender.keys
        return torch.stack([self.full_keys(h) if h not in self.borrowed else cache.layers[self.borrowed[h]].full_keys(h)
                            for h in range(self.kv_heads)], dim=1)

    def _by_head(self, own: torch.Tensor, borrowing: torch.Tensor) -> torch.Tensor:
        """Interleave the own heads' and the borrowing heads' tensors back into head order."""
        order = {h: own[:, i] for i, h in enumerate(self.own_heads)}
        order.update({h: borrowing[:, i] for i, h in enumerate(self.borrowing_heads)})
        return torch.stack([order[h] for h in range(self.kv_heads)], dim=1)

    def settle(self, slack: int) -> None:
        """Copy sink tokens that arrived since the last settle into their columns; drop recent columns older than
        the window (plus `slack`)."""
        batch, device = self.values.shape[0], self.values.device
        first = self._first(batch, device)
        if self.settled < self.seen and self.sinks:
            sink_positions = first[:, None] + torch.arange(self.sinks, device=device)
            column = sink_positions - (self.seen - self.span) + self.sinks
            arrived = (sink_positions >= self.settled) & (sink_positions < self.seen) & (column >= self.sinks)
            column = torch.where(arrived, column, torch.arange(self.sinks, device=device).expand(batch, -1))
            index = column[:, None, :, None].expand(-1, self.edge_keys.shape[1], -1, self.edge_keys.shape[-1])
            self.edge_keys = torch.cat([self.edge_keys.gather(2, index), self.edge_keys[:, :, self.sinks :]], dim=2)
        self.settled = self.seen
        keep = min(self.span, self.recent + slack)
        if keep < self.span:
            self.edge_keys = torch.cat([self.edge_keys[:, :, : self.sinks], self.edge_keys[:, :, self.sinks + self.span - keep :]], dim=2)
            self.span = keep

    def keep_top(self, scores: torch.Tensor, counts: list[int], window: int, follow: dict | None = None) -> torch.Tensor:
        """Own heads keep by their own scores; a borrowing head keeps what its bottom layer kept for that head,
        since it pairs those keys with its own values."""
        index, chosen = self.select(scores, counts, window)
        if self.positions is not None or any(follow[h] is None for h in self.borrowing_heads):
            raise RuntimeError("a PoD layer evicts once, after the prefill, after its group's bottom layer")
        width = max([index.shape[-1]] + [follow[h][0].shape[-1] for h in self.borrowing_heads])
        index, chosen = _pad(index, width, 0), _pad(chosen, width, False)
        for h in self.borrowing_heads:
            index[:, h], chosen[:, h] = _pad(follow[h][0][:, h], width, 0), _pad(follow[h][1][:, h], width, False)
        self.selection = (index, chosen)
        return self.keep_slots(index, chosen, scores.shape[-1])

    def drop_last(self, count: int) -> None:
        super().drop_last(count)
        self.edge_keys = self.edge_keys[:, :, :-count]
        self.span -= count
        self.settled = min(self.settled, self.seen)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.edge_keys = self.edge_keys.index_select(0, beam_idx.to(self.edge_keys.device))
        if self.first is not None:
            self.first = self.first.index_select(0, beam_idx.to(self.first.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.edge_keys = self.edge_keys.repeat_interleave(repeats, dim=0)
        if self.first is not None:
            self.first = self.first.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.edge_keys = self.edge_keys[indices]
        if self.first is not None:
            self.first = self.first[indices]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("cannot crop a PoD cache: keys that left the recent window are gone")

    def reset(self) -> None:
        super().reset()
        self.edge_keys, self.first, self.span, self.settled = None, None, 0, 0


def _pad(tensor: torch.Tensor, width: int, fill) -> torch.Tensor:
    missing = width - tensor.shape[-1]
    if missing <= 0:
        return tensor.clone()
    return torch.cat([tensor, tensor.new_full((*tensor.shape[:-1], missing), fill)], dim=-1)


class PodRuntime(Runtime):
    """A layer some of whose KV heads borrow distant keys keeps those heads' keys for proximal tokens only; the
    optional skip of the distant view lives on the cache, with its counts."""

    module = "pod"

    def cache_layer(self, config, layer_idx: int):
        borrowed = config.borrowed_heads(layer_idx)
        if not borrowed:
            return None
        return PodKVLayer(config.num_key_value_heads, borrowed, config.pod_sink_tokens, config.pod_recent_tokens)

    def prepare_cache(self, cache, config) -> None:
        if config.pod_distant_skip is not None:
            cache.view_skip = DistantSkip(config.pod_distant_skip)


RUNTIME = PodRuntime()

__all__ = ["RUNTIME", "PodKVLayer"]
