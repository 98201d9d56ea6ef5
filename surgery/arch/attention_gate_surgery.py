"""Attention-Gate (Zeng et al., arXiv 2410.12876) at run time: learned in-context KV eviction.

Each K/V-owning layer has a small attention module over its input hidden states, the gate. It outputs, for every
token and KV head, a keep probability p = σ(logit); the flag is keep = p ≥ τ. A token flagged for eviction is read
by its own query only: every later query of that layer (and of the layers that share its cache) no longer sees it,
and the cache drops it after the forward, per (sequence, KV head). Kept tokens stay as they are, so the cache holds
exactly the kept slots of every head, plus the gate's own keys and values, which it needs to flag later tokens.

Deviation from the paper: the gate is causal (the paper's reads the whole context), so a token's flag depends only
on the tokens up to it. That is what lets cached decoding flag each new token as it arrives and agree with a full
forward. In training the flags are straight-through: hard in the forward pass, the soft probability in the
backward pass (`weights` of the attention view), so an evicted token still learns whether it should come back.

Shipped flat inside every checkpoint: imports torch only (and the attention core beside it).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .attention_surgery import KVView, Queries, ViewRule, attend, attend_dense, pick_head, slot_positions
from .kvlayer_surgery import PlainCacheLayer
from .runtime_surgery import Runtime

NEVER = torch.iinfo(torch.long).max  # `until` of a kept slot: every later query reads it


@dataclass
class Retention:
    """A gate's decision for the tokens of one forward.

    keep: (batch, kv_heads, q) bool, the hard flags.
    probability: (batch, kv_heads, q) float32, σ(logit).
    weights: the straight-through keep weights (keep + p − p.detach()) in training, else None.
    """

    keep: torch.Tensor
    probability: torch.Tensor
    weights: torch.Tensor | None = None

    def until(self, positions: torch.Tensor) -> torch.Tensor | None:
        """(batch, kv_heads, q): the last query position that reads each token; None when every token is kept."""
        if self.weights is not None or bool(self.keep.all()):
            return None
        return torch.where(self.keep, torch.full_like(self.keep, NEVER, dtype=torch.long), positions)


@dataclass
class Eviction(ViewRule):
    """A gate's decision as a view rule: a slot is read by queries up to `until` (a token flagged for eviction by
    its own query only); in training, `weights` are the straight-through keep flags on each slot.

    until: (batch, kv_heads|1, slots) or None; weights: (batch, kv_heads, slots) or None.
    """

    until: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    key: tuple = ("until",)
    per_slot: bool = True

    def allows(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor | None:
        return None if self.until is None else query_positions <= self.until[:, :, None, :]

    def head(self, head: int) -> "Eviction":
        return Eviction(pick_head(self.until, head), pick_head(self.weights, head))

    def slot_weights(self) -> torch.Tensor | None:
        return self.weights

    def kernel_arguments(self) -> dict:
        return {} if self.until is None else {"key_until": self.until}


def eviction_rules(until: torch.Tensor | None, weights: torch.Tensor | None) -> tuple[ViewRule, ...]:
    return () if until is None and weights is None else (Eviction(until, weights),)


class AttentionGate(nn.Module):
    """One layer's gate: causal attention with `heads` heads of width `width` over the layer's input hidden states
    (no RoPE: the hidden states already carry position) plus a residual, the token's own gate value, then one logit
    per KV head. Without the residual an untrained gate attends uniformly, so its output is a running mean of the
    prefix in which the token itself weighs 1/position: trained so, the gates switched whole heads on or off rather
    than choosing tokens.

    Initialised to keep everything: the output weight is zero and its bias `open_bias` > 0, so a freshly converted
    model computes exactly what the source computes, and training starts from there.
    """

    def __init__(self, hidden_size: int, kv_heads: int, heads: int, width: int, threshold: float,
                 open_bias: float = 2.0):
        super().__init__()
        self.heads, self.width, self.threshold = heads, width, threshold
        self.query = nn.Linear(hidden_size, heads * width, bias=False)
        self.key = nn.Linear(hidden_size, heads * width, bias=False)
        self.value = nn.Linear(hidden_size, heads * width, bias=False)
        self.out = nn.Linear(heads * width, kv_heads, bias=True)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, open_bias)
        self.rate: torch.Tensor | None = None  # training: this forward's straight-through keep rate per KV head
        self.noise_seed: int | None = None  # training: seeds this step's flag noise (set before each step)
        self.noise = 0.0  # training: scale of the logistic noise on the logits (0: deterministic flags)

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = projected.shape
        return projected.view(batch, seq, self.heads, self.width).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, store: "GatedKVLayer", positions: torch.Tensor,
                padding: torch.Tensor | None) -> Retention:
        own = self._heads(self.value(hidden_states))
        keys, values = store.update_gate(self._heads(self.key(hidden_states)), own)
        valid = None if padding is None else padding[:, None, : keys.shape[2]]
        queries = Queries(self._heads(self.query(hidden_states)), positions)
        out, _ = attend(queries, [KVView(keys, values, None, valid)], self.width**-0.5, "sdpa")
        out = out + own.transpose(1, 2)  # the residual: a token's own features, not diluted by its prefix
        logits = self.out(out.reshape(*hidden_states.shape[:-1], -1)).transpose(1, 2)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # flags decided in fp32 or better
        probability = torch.sigmoid(logits)
        keep = probability >= self.threshold
        weights = None
        if self.training:
            if self.noise and self.noise_seed is not None:
                keep = logits + self.noise * self._logistic_noise(logits) >= torch.logit(logits.new_tensor(self.threshold))
            weights = keep.to(probability.dtype) + (probability - probability.detach())  # exactly 0 or 1 forward
            real = weights.new_ones(weights.shape[0], 1, weights.shape[-1]) if padding is None else \
                padding[:, None, -weights.shape[-1]:].to(weights.dtype)
            self.rate = (weights * real).sum((0, 2)) / real.sum()  # per KV head
        return Retention(keep, probability, weights)

    def _logistic_noise(self, logits: torch.Tensor) -> torch.Tensor:
        """Logistic(0, 1) noise from this step's seed: the same draw when gradient checkpointing runs the forward
        again. With noise 1 and τ = 0.5 a token is kept with probability exactly σ(logit)."""
        generator = torch.Generator(device=logits.device).manual_seed(self.noise_seed)
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        uniform = uniform.clamp(torch.finfo(logits.dtype).tiny, 1 - torch.finfo(logits.dtype).eps)
        return torch.log(uniform) - torch.log1p(-uniform)


@dataclass
class HeadSlots:
    """One KV head's kept tokens: keys (batch, n, key width), values (batch, n, value width), the token position of
    each slot (batch, n) and which slots are real (batch, n): sequences of a batch keep different counts."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.positions, self.valid

    def map(self, fn) -> "HeadSlots":
        return HeadSlots(*(fn(t) for t in self.tensors()))

    def compact(self) -> "HeadSlots":
        """Only the real slots, in order, padded across the batch to the longest sequence's count."""
        width = int(self.valid.sum(-1).max()) if self.valid.numel() else 0
        index = torch.argsort((~self.valid).to(torch.int8), dim=-1, stable=True)[:, :width]
        return HeadSlots(self.keys.gather(1, index[..., None].expand(-1, -1, self.keys.shape[-1])),
                         self.values.gather(1, index[..., None].expand(-1, -1, self.values.shape[-1])),
                         self.positions.gather(1, index), self.valid.gather(1, index))


@dataclass
class HeadViews:
    """What a gated layer's queries read of earlier forwards: each KV head's kept slots (heads keep different
    counts), one single-head `KVView` per head, attended head by head where they lie. Stacking them into one
    tensor would pad and copy the whole layer's cache at every step; `joined` does that only where one tensor is
    needed (the Triton kernels). The attention core asks a view that is not a KVView for `partial` and `joined`."""

    heads: list[KVView]

    def partial(self, queries: Queries, scaling: float, implementation: str, window: int | None,
                dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, q, heads, d) and the lse: each KV head's query group against that head's own slots."""
        query = queries.states
        group = query.shape[1] // len(self.heads)
        parts = [attend_dense(queries, query[:, h * group : (h + 1) * group], view, scaling, implementation, window,
                              dropout, need_lse=True) for h, view in enumerate(self.heads)]
        return torch.cat([out for out, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=1)

    def joined(self) -> KVView:
        """One view: the heads padded to the longest and stacked (a transient copy of the layer)."""
        width = max(view.slots for view in self.heads)
        batch = max(view.keys.shape[0] for view in self.heads)
        device = self.heads[0].keys.device
        joined: dict[str, list[torch.Tensor]] = {"keys": [], "values": [], "positions": [], "valid": []}
        for view in self.heads:
            positions = slot_positions(view, device)  # where a view carries none, its slots precede every query
            valid = view.valid if view.valid is not None else torch.ones(1, 1, view.slots, dtype=torch.bool,
                                                                        device=device)
            for name, tensor, fill in (("keys", view.keys, 0.0), ("values", view.values, 0.0),
                                       ("positions", positions, 0), ("valid", valid, False)):
                tensor = tensor.expand(batch, *tensor.shape[1:])
                missing = width - tensor.shape[2]
                joined[name].append(torch.cat([tensor, tensor.new_full((*tensor.shape[:2], missing,
                                                                        *tensor.shape[3:]), fill)], dim=2))
        return KVView(*(torch.cat(joined[name], dim=1) for name in ("keys", "values", "positions", "valid")))


PADDING_FILL = {"keys": 0.0, "values": 0.0, "positions": 0, "valid": False, "until": NEVER, "weights": 0.0}


def _pad_slots(tensor: torch.Tensor, width: int, fill) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_full((tensor.shape[0], missing, *tensor.shape[2:]), fill)], dim=1)


class GatedKVLayer(PlainCacheLayer):
    """A gated layer's cache: per KV head exactly the tokens its gate kept (no head is padded to another's count),
    the tokens of the forward in progress, and the gate's own keys and values (every token: the gate reads them
    to flag later tokens). The attention reads one view assembled from these, a transient copy of one layer.

    Keys of a MatryoshkaKV layer arrive packed (batch, 1, seq, Σ rank); `widths` says how wide each head's block is.
    """

    def __init__(self, kv_heads: int):
        self.kv_heads = kv_heads
        self.seen = 0
        self.widths: tuple[list[int], list[int]] | None = None
        self.heads: list[HeadSlots] | None = None  # settled: what earlier forwards kept
        self.fresh: tuple[torch.Tensor, torch.Tensor, Retention | None] | None = None  # this forward's K/V and flags
        self.gate_keys: torch.Tensor | None = None
        self.gate_values: torch.Tensor | None = None
        self.real: torch.Tensor | None = None  # (batch, q): this forward's tokens that are not left padding

    def __repr__(self) -> str:
        return f"GatedKVLayer(kv_heads={self.kv_heads}, seen={self.seen})"

    @property
    def values(self) -> torch.Tensor | None:
        """A tensor whose first dim is the batch (what the cache checks to see the layer has run)."""
        if self.fresh is not None:
            return self.fresh[1]
        return None if self.heads is None else self.heads[0].values

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def update_gate(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_keys is not None:
            keys, values = torch.cat([self.gate_keys, keys], dim=2), torch.cat([self.gate_values, values], dim=2)
        self.gate_keys, self.gate_values = keys, values
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, widths=None, retention=None,
               **kwargs):
        if retention is None:
            raise RuntimeError("a gated layer's K/V arrive with its gate's flags")
        if self.fresh is not None:
            raise RuntimeError("a gated layer settles each forward before the next one")
        self.fresh = (key_states, value_states, retention)
        self.widths = widths
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def _block(self, tensor: torch.Tensor, head: int, side: int) -> torch.Tensor:
        """(batch, q, width): one head's part of this forward's keys (side 0) or values (side 1)."""
        if self.widths is None:
            return tensor[:, head]
        start = sum(self.widths[side][:head])
        return tensor[:, 0, :, start : start + self.widths[side][head]]

    def _fresh_heads(self, kept_only: bool) -> list[HeadSlots]:
        """This forward's tokens per head; `valid`: the real ones (not left padding), and with `kept_only` only those
        the gate kept."""
        keys, values, retention = self.fresh
        batch, q = values.shape[0], values.shape[-2]
        positions = torch.arange(self.seen - q, self.seen, device=values.device).expand(batch, q)
        return [HeadSlots(self._block(keys, h, 0), self._block(values, h, 1), positions,
                          self.real & retention.keep[:, h] if kept_only else self.real) for h in range(self.kv_heads)]

    def views(self, layer_idx: int, padding: torch.Tensor | None, projection, cache) -> list[KVView]:
        """The kept slots of earlier forwards and every token of this one; a token flagged for eviction is read by
        its own query only (`until`), or, in training, weighted by its straight-through flag."""
        keys, values, retention = self.fresh
        batch, q = values.shape[0], values.shape[-2]
        self.real = torch.ones(batch, q, dtype=torch.bool, device=values.device) if padding is None else \
            padding[:, self.seen - q : self.seen].bool()
        until = retention.until(torch.arange(self.seen - q, self.seen, device=values.device).expand_as(retention.keep))
        layout = None  # each gated layer has its own flags: a mask no other layer could reuse is not kept
        if self.heads is None:  # the first forward: its tokens are the whole cache, read in place
            valid = None if padding is None else padding[:, None, : self.seen]
            return [KVView(keys, values, None, valid, projection, layout, eviction_rules(until, retention.weights))]
        if self.widths is None:
            return [self._settled_view(q), self._fresh_view(until, retention.weights)]
        return self._assembled_view(until, retention, projection)

    def _settled_view(self, q: int) -> HeadViews:
        """What earlier forwards kept, each head's own tensors as they are (no copy). Every kept slot precedes this
        forward's tokens, so a single query needs neither positions nor a mask where every slot is real."""
        views = []
        for head in self.heads:
            plain = q == 1 and bool(head.valid.all())  # gated layers are full-attention layers: no window
            views.append(KVView(head.keys[:, None], head.values[:, None], None if plain else head.positions[:, None],
                                None if plain else head.valid[:, None]))
        return HeadViews(views)

    def _fresh_view(self, until: torch.Tensor | None, weights: torch.Tensor | None) -> KVView:
        """This forward's tokens, every head: a token flagged for eviction is read by its own query only."""
        keys, values, _ = self.fresh
        q = values.shape[-2]
        positions = torch.arange(self.seen - q, self.seen, device=values.device)[None, None]
        return KVView(keys, values, positions, self.real[:, None], None, None, eviction_rules(until, weights))

    def _assembled_view(self, until: torch.Tensor | None, retention: Retention, projection) -> list[KVView]:
        """Packed reduced-width heads (MatryoshkaKV): one view, the kept slots and this forward's padded to the
        longest head and stacked (a transient copy of the layer)."""
        batch = self.fresh[1].shape[0]
        columns: dict[str, list[torch.Tensor]] = {name: [] for name in PADDING_FILL}
        for h, (old, new) in enumerate(zip(self.heads, self._fresh_heads(kept_only=False))):
            for name, pair in zip(("keys", "values", "positions", "valid"), zip(old.tensors(), new.tensors())):
                columns[name].append(torch.cat(pair, dim=1))
            settled = old.valid.shape[1]
            if until is not None:
                columns["until"].append(torch.cat([until.new_full((batch, settled), NEVER), until[:, h]], dim=1))
            if retention.weights is not None:
                weights = retention.weights
                columns["weights"].append(torch.cat([weights.new_ones(batch, settled), weights[:, h]], dim=1))
        width = max(t.shape[1] for t in columns["valid"])
        padded = {name: [_pad_slots(t, width, PADDING_FILL[name]) for t in ts] for name, ts in columns.items()}

        def stacked(name: str) -> torch.Tensor | None:
            return torch.stack(padded[name], dim=1) if padded[name] else None

        keys, values = (torch.cat(padded[name], dim=-1)[:, None] for name in ("keys", "values"))  # side by side
        return [KVView(keys, values, stacked("positions"), stacked("valid"), projection, None,
                       eviction_rules(stacked("until"), stacked("weights")))]

    def settle(self, slack: int) -> None:
        """After a forward that keeps its cache: keep, per (sequence, KV head), the tokens the gate kept; the others
        (and left padding) leave the cache's tensors."""
        if self.fresh is None:
            return
        fresh = [head.compact() for head in self._fresh_heads(kept_only=True)]
        if self.heads is None:
            merged = fresh
        else:
            merged = [HeadSlots(*(torch.cat(pair, dim=1) for pair in zip(old.tensors(), new.tensors())))
                      for old, new in zip(self.heads, fresh)]
        # holes remain only where the sequences of a batch kept different counts (one sequence: never)
        self.heads = [head if bool(head.valid.all()) else head.compact() for head in merged]
        self.fresh = None

    def kept_slots(self) -> torch.Tensor:
        """(batch, kv_heads): tokens each head keeps."""
        return torch.stack([head.valid.sum(-1) for head in self.heads], dim=1)

    def held_tokens(self) -> tuple[int, int]:
        """(token, KV head) pairs held and seen (left padding counts as seen, as in the other layers)."""
        batch = self.values.shape[0]
        held = int(self.kept_slots().sum()) if self.heads is not None else batch * self.kv_heads * self.seen
        return held, batch * self.kv_heads * self.seen

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        """K/V of the kept slots, of the forward in progress, and the gate's own state."""
        tensors = [t for head in (self.heads or []) for t in (head.keys, head.values)]
        if self.fresh is not None:
            tensors += [self.fresh[0], self.fresh[1]]
        return tuple(tensors + [t for t in (self.gate_keys, self.gate_values) if t is not None])

    def drop_last(self, count: int) -> None:
        """Forget the newest `count` tokens of the forward in progress (a layer re-run by gradient checkpointing)."""
        if self.fresh is None or self.fresh[1].shape[-2] != count:
            raise RuntimeError("a gated layer can drop only the whole forward in progress")
        self.fresh = None
        self.seen -= count
        self.gate_keys, self.gate_values = self.gate_keys[:, :, :-count], self.gate_values[:, :, :-count]
        if self.gate_keys.shape[2] == 0:
            self.gate_keys = self.gate_values = None

    def keep_top(self, *args, **kwargs):
        raise RuntimeError("a gated layer evicts by its Attention-Gate; a KV budget policy cannot run on it")

    def _each_batch(self, fn) -> None:
        if self.heads is not None:
            self.heads = [head.map(fn) for head in self.heads]
        if self.gate_keys is not None:
            self.gate_keys, self.gate_values = fn(self.gate_keys), fn(self.gate_values)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("cannot crop a gated cache: evicted tokens are gone")

    def reset(self) -> None:
        self.__init__(self.kv_heads)


class AttentionGateRuntime(Runtime):
    """Every full-attention K/V-owning layer has a gate, and a cache store that keeps, per KV head, only the slots
    it flags; a sliding layer keeps its window, which already bounds its cache."""

    module = "attention_gate"

    def cache_layer(self, config, layer_idx: int):
        if layer_idx not in config.full_attention_owners:
            return None
        return GatedKVLayer(config.num_key_value_heads)

    def build_attention(self, attention, config) -> None:
        if attention.layer_idx in config.full_attention_owners:
            attention.gate = AttentionGate(config.hidden_size, attention.num_kv_heads, config.attention_gate_heads,
                                           config.attention_gate_width, config.attention_gate_threshold)


RUNTIME = AttentionGateRuntime()

__all__ = ["RUNTIME", "AttentionGate", "GatedKVLayer", "HeadSlots", "Retention"]
