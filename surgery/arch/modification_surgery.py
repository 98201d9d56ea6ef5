"""MoDification (Zhang et al., arXiv 2410.14268) at run time: mixture-of-depths routing with the threshold-p operator.

A routed layer has a router g = σ(w·x̂ + b) per token, over the layer's normalised input x̂. A token with g ≥ p
goes through the layer's attention and MLP, and the layer's update is scaled by g / stopgrad(g): 1 in value, the
gradient of g backward. Any other token skips the layer: its hidden state passes through unchanged, the layer
computes nothing for it and caches none of its K/V. Each token is routed on its own (no top-k over the sequence),
so routing is causal and decoding routes every new token as it arrives.

The layer gathers the routed tokens of each sequence (sequences of a batch route differently: shorter rows are
padded and masked), runs them, and scatters the updates back. Its cache holds the routed tokens only, with their
original positions; later queries find them by position, as the attention core masks every layout.

Shipped flat inside every checkpoint: imports torch only (and the attention core beside it).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .attention_surgery import KVView
from .kvlayer_surgery import PlainCacheLayer
from .runtime_surgery import Runtime


@dataclass
class Route:
    """Which tokens of one forward go through a routed layer.

    index: (batch, r) each routed token's index in the forward, in order; rows that route fewer are padded at the end.
    valid: (batch, r) which entries of `index` are routed tokens, not padding.
    scale: (batch, r) g / stopgrad(g) of each entry: exactly 1, with g's gradient.
    positions: (batch, r) the token position of each entry.
    tokens: the tokens of the forward (routed or not), which the layer's cache counts as seen.
    """

    index: torch.Tensor
    valid: torch.Tensor
    scale: torch.Tensor
    positions: torch.Tensor
    tokens: int

    @property
    def empty(self) -> bool:
        return self.index.shape[1] == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(batch|1, q, ...) -> (batch, r, ...): the routed tokens' entries."""
        tensor = tensor.expand(self.index.shape[0], *tensor.shape[1:])
        index = self.index.view(*self.index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
        return tensor.gather(1, index)

    def scatter(self, hidden_states: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """hidden_states (batch, q, d) plus each routed token's scaled update (batch, r, d); padding adds nothing."""
        weight = (self.scale * self.valid).to(update.dtype)
        index = self.index[..., None].expand(-1, -1, update.shape[-1])
        return hidden_states.scatter_add(1, index, update * weight[..., None])


class Router(nn.Module):
    """g = σ(w·x̂ + b), one per token; routed where g ≥ `threshold`.

    Initialised to route every token (w = 0, σ(b) ≥ threshold), so the converted model computes what the source
    computes. Counts the tokens it saw, routed, and ran (routed plus padding: what the layer computed); in training it
    keeps this forward's routed fraction F (hard, straight-through to the mean g) and mean g, for the regularisers.
    """

    def __init__(self, hidden_size: int, threshold: float):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=True)
        self.threshold = threshold
        self.seen_tokens = 0
        self.routed_tokens = 0
        self.computed_tokens = 0  # routed tokens plus the padding of rows that routed fewer: what the layer ran
        self.fraction: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None

    def forward(self, normed: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None) -> Route:
        """normed: (batch, q, hidden); positions: (1, q); real: (batch, q) bool, False for left padding, or None."""
        logits = self.proj(normed).squeeze(-1)
        gate = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        routed = gate >= self.threshold
        real = torch.ones_like(routed) if real is None else real
        routed &= real
        width = int(routed.sum(1).max())
        index = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = routed.gather(1, index)
        scale = (gate / gate.detach()).gather(1, index).to(normed.dtype)
        self.seen_tokens += int(real.sum())
        self.routed_tokens += int(routed.sum())
        self.computed_tokens += index.numel()
        if self.training:
            count = real.sum().clamp(min=1)
            mean = (gate * real).sum() / count
            self.fraction = routed.sum() / count + (mean - mean.detach())
            self.mean = mean
        return Route(index, valid, scale, positions.expand_as(routed).gather(1, index), normed.shape[1])

    def reset_counts(self) -> None:
        self.seen_tokens = self.routed_tokens = self.computed_tokens = 0


class RoutedKVLayer(PlainCacheLayer):
    """A routed layer's cache: the K/V of the tokens it routed, with each slot's position and validity (sequences
    of a batch route different counts, padded to the longest); it still counts every token as seen.

    keys, values: (batch, kv_heads, slots, head_dim), or packed (batch, 1, slots, Σ widths) under MatryoshkaKV.
    positions, valid: (batch, 1, slots).
    """

    def __init__(self):
        self.seen = 0
        self.keys = self.values = self.positions = self.valid = None
        self.widths = None
        self.last = (0, 0)  # (slots, tokens) the last forward appended
        self.by_slot = False  # this forward's queries carry slot indices (see first_slot)

    def __repr__(self) -> str:
        return f"RoutedKVLayer(seen={self.seen}, slots={0 if self.values is None else self.values.shape[-2]})"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, route: Route, widths=None,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        positions, valid = route.positions[:, None], route.valid[:, None]
        if self.values is not None:
            key_states = torch.cat([self.keys, key_states], dim=-2)
            value_states = torch.cat([self.values, value_states], dim=-2)
            positions, valid = torch.cat([self.positions, positions], -1), torch.cat([self.valid, valid], -1)
        self.keys, self.values, self.positions, self.valid = key_states, value_states, positions, valid
        self.widths = widths
        self.seen += route.tokens
        self.last = (route.index.shape[1], route.tokens)
        return key_states, value_states

    def pass_over(self, tokens: int) -> None:
        """A forward in which no sequence routed a token: nothing to store, the tokens are seen all the same."""
        self.seen += tokens
        self.last = (0, tokens)

    def first_slot(self, route: Route) -> int | None:
        """The slot the route's first token will take when this forward can attend by slot index: the slots stay
        contiguous (every sequence of the batch routed the same count, before and now: no padding slot anywhere; a
        routed layer is a full-attention layer, so no window counts positions). Else None, and this forward's view
        carries the slots' positions."""
        holes = not bool(route.valid.all()) or (self.valid is not None and not bool(self.valid.all()))
        self.by_slot = not holes
        if not self.by_slot:
            return None
        return 0 if self.values is None else self.values.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def views(self, layer_idx: int, padding: torch.Tensor | None, projection, cache) -> list[KVView]:
        """Slots with their positions; without holes, plain slots (the queries then carry slot indices)."""
        if self.by_slot:
            return [KVView(self.keys, self.values, None, None, projection, ("routed", layer_idx))]
        return [KVView(self.keys, self.values, self.positions, self.valid, projection, ("routed", layer_idx))]

    def settle(self, slack: int) -> None:
        """Close the holes that padding of rows that routed fewer tokens left (one sequence: never any)."""
        if self.valid is None or bool(self.valid.all()):
            return
        width = int(self.valid.sum(-1).max())
        index = torch.argsort((~self.valid).to(torch.int8), dim=-1, stable=True)[..., :width]  # (batch, 1, width)
        self.keys, self.values = (t.gather(2, index[..., None].expand(-1, t.shape[1], -1, t.shape[-1]))
                                  for t in (self.keys, self.values))
        self.positions, self.valid = self.positions.gather(-1, index), self.valid.gather(-1, index)

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.keys, self.values) if t is not None)

    def held_tokens(self) -> tuple[int, int]:
        """(token, KV head) pairs held and seen."""
        batch, heads = self.values.shape[0], (len(self.widths[1]) if self.widths is not None else self.values.shape[1])
        return int(self.valid.sum()) * heads, batch * heads * self.seen

    def drop_last(self, count: int) -> None:
        """Forget the forward in progress (`count` tokens: a layer re-run by gradient checkpointing, or a probe)."""
        slots, tokens = self.last
        if tokens != count:
            raise RuntimeError("a routed layer can drop only the whole forward in progress")
        if slots:
            self.keys, self.values = self.keys[..., :-slots, :], self.values[..., :-slots, :]
            self.positions, self.valid = self.positions[..., :-slots], self.valid[..., :-slots]
        self.seen -= tokens
        self.last = (0, 0)

    def _each_batch(self, fn) -> None:
        if self.values is not None:
            self.keys, self.values, self.positions, self.valid = map(fn, (self.keys, self.values, self.positions,
                                                                          self.valid))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("cannot crop a routed layer's cache: it holds only the tokens it routed")

    def reset(self) -> None:
        self.__init__()


class ModificationRuntime(Runtime):
    """Each routed layer has a router, and a cache store that holds only the tokens it routed."""

    module = "modification"

    def cache_layer(self, config, layer_idx: int):
        return RoutedKVLayer() if layer_idx in config.modification_layers else None

    def build_layer(self, layer, config) -> None:
        if layer.self_attn.layer_idx in config.modification_layers:
            layer.router = Router(config.hidden_size, config.modification_threshold)


RUNTIME = ModificationRuntime()

__all__ = ["RUNTIME", "Route", "Router", "RoutedKVLayer"]
