"""Per-layer KV budgets: what every token-eviction policy shares (scoring, apportioning, gathering).

A policy is a small class over `BudgetPolicy`, as kvpress's presses are: it says how many tokens each layer keeps
(`layer_weights`), and may act while the prefill runs (`observe`). The scorer is pluggable; the default is
SnapKV's observation window: the last `window` prompt tokens attend to every earlier key, the attention is summed
over those queries, pooled along the sequence (kernel 7) and averaged over the query heads of each KV head. Each
(sequence, layer, KV head) then keeps the window and its top-scoring earlier tokens; the cache does the gathering.
A policy lives for one forward pass: nothing is carried from one call to the next.

Shipped flat inside every checkpoint: imports torch only (and, behind a guard, the Triton window-sums kernel).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_surgery import kernels_usable, soft_cap, window_sums_from_lse

POOLING_KERNEL = 7


@dataclass
class LayerScores:
    """What one layer's prefill tells the policy: pooled prefix scores per KV head, and the window-averaged
    attention each query head gives every token (ZigZagKV's attention mass)."""

    pooled: torch.Tensor  # (batch, kv_heads, prefix) float32, -inf on padding
    mass: torch.Tensor  # (batch, heads, n) float32


def observation_window_sums(query: torch.Tensor, key: torch.Tensor, padding: torch.Tensor | None, window: int,
                            scaling: float, softcap: float | None = None) -> torch.Tensor:
    """(batch, heads, n): softmax attention of the last `window` queries to every key, summed over those queries,
    with the layer's own score cap (Gemma 2). Only a window × n block of scores is ever formed."""
    n = query.shape[2]
    window = min(window, n)
    group = query.shape[1] // key.shape[1]
    logits = query[:, :, n - window :].float() @ key.float().repeat_interleave(group, dim=1).transpose(2, 3) * scaling
    logits = soft_cap(logits, softcap)
    allowed = torch.arange(n, device=query.device)[None, :] <= torch.arange(n - window, n, device=query.device)[:, None]
    allowed = allowed[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, :n].bool()
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1).sum(2)


class ObservationWindowScorer:
    """SnapKV's scores: window sums, pooled, averaged per KV head. Uses the prefill kernel's log-sum-exp when the
    Triton path ran, so the window × n attention block is never formed."""

    def __init__(self, window: int, pooling: str = "avg", kernel: int = POOLING_KERNEL):
        self.window, self.pooling, self.kernel = window, pooling, kernel

    def sums(self, query, key, padding, scaling, lse=None, softcap=None) -> torch.Tensor:
        if lse is not None and window_sums_from_lse is not None and kernels_usable(query):
            valid = None if padding is None else padding[:, None, : key.shape[2]].bool().expand(-1, key.shape[1], -1)
            return window_sums_from_lse(query, key, lse, scaling, self.window, valid=valid, all_slots=True,
                                        softcap=softcap)
        return observation_window_sums(query, key, padding, self.window, scaling, softcap)

    def __call__(self, query, key, padding, scaling, lse=None, softcap=None) -> LayerScores:
        return self.from_sums(self.sums(query, key, padding, scaling, lse, softcap), key.shape[1], padding)

    def from_sums(self, sums: torch.Tensor, kv_heads: int, padding: torch.Tensor | None) -> LayerScores:
        batch, heads, n = sums.shape
        window = min(self.window, n)
        prefix = sums[..., : n - window]
        if prefix.shape[-1] > 0:
            pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
            prefix = pool(prefix.flatten(0, 1)[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
            prefix = prefix.view(batch, heads, -1)
        pooled = prefix.view(batch, kv_heads, heads // kv_heads, -1).mean(2)
        if padding is not None:
            pooled = pooled.masked_fill(~padding[:, None, : n - window].bool(), float("-inf"))
        return LayerScores(pooled=pooled, mass=sums / window)


def tokens_to_reach(mass: torch.Tensor, fraction: float) -> torch.Tensor:
    """How many of the largest entries of each row it takes to reach `fraction` of the row's total."""
    ordered = mass.sort(-1, descending=True).values.cumsum(-1)
    return (ordered < fraction * ordered[..., -1:]).sum(-1) + 1


def apportion(weights: torch.Tensor, total: int, low: int, high: int) -> list[int]:
    """Integers proportional to `weights`, each within [low, high], summing to `total` (largest remainders).

    Entries that hit a bound are fixed there and the rest is shared again among the others, by weight.
    """
    count = weights.numel()
    total = max(low * count, min(high * count, total))
    weights = weights.double().clamp(min=1e-12)
    values = torch.zeros(count, dtype=torch.float64)
    free = torch.ones(count, dtype=torch.bool)
    for _ in range(2 * count + 1):
        remaining = total - values[~free].sum()
        values[free] = remaining * weights[free] / weights[free].sum()
        below, above = free & (values < low), free & (values > high)
        if above.any():  # fix one side at a time: what overflows first, since it lifts the others
            values[above] = float(high)
            free &= ~above
        elif below.any():
            values[below] = float(low)
            free &= ~below
        else:
            break
    result = values.floor().long().clamp(low, high)
    leftover = total - int(result.sum())
    for index in torch.argsort(values - values.floor(), descending=True).tolist():
        if leftover <= 0:
            break
        if result[index] < high:
            result[index] += 1
            leftover -= 1
    return result.tolist()


class BudgetPolicy:
    """Decides how many tokens each K/V-owning layer keeps after one prefill; the cache does the gathering.

    budget: fraction of each sequence's real prompt kept per layer on average; or budget_tokens, a count.
    min_tokens: with a fraction, each layer keeps at least this many tokens on average (a short prompt stays whole).
    Subclasses set `name` and `default_window`, and override `layer_weights` (how the total B·L is shared) or
    `observe` (acting while the prefill runs).
    """

    name = "base"
    default_window = 32

    def __init__(self, budget: float | None, budget_tokens: int | None, owners: list[int],
                 prompt_lengths: torch.Tensor, window: int | None = None, calibrated_weights: list[float] | None = None,
                 pooling: str = "avg", min_tokens: int = 0):
        self.owners = owners
        self.window = window or self.default_window
        self.prompt_lengths = prompt_lengths  # (batch,) real tokens per sequence
        per_layer = (prompt_lengths.double() * budget).clamp(min=min_tokens) if budget_tokens is None else \
            torch.full_like(prompt_lengths, budget_tokens, dtype=torch.float64)
        self.base = per_layer.round().long().clamp(min=1)  # B per sequence: average tokens kept per layer
        self.calibrated_weights = calibrated_weights
        self.scorer = ObservationWindowScorer(self.window, pooling)
        self.scores: dict[int, LayerScores] = {}

    def score_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor, padding: torch.Tensor | None,
                    scaling: float, cache, lse: torch.Tensor | None = None, softcap: float | None = None) -> None:
        """Called by each K/V-owning layer during prefill, with its post-RoPE queries and keys (and the prefill
        kernel's row log-sum-exp when the Triton path ran); scores use the layer's score cap (Gemma 2)."""
        self.scores[layer] = self.scorer(query, key, padding, scaling, lse, softcap)
        self.observe(layer, cache)

    def observe(self, layer: int, cache) -> None:
        """Act while the prefill runs; most policies wait for `finish`."""

    def sequence_budget(self, sequence: int) -> tuple[int, int, int]:
        """(real prompt length n, tokens per layer B, window w) of one sequence."""
        n = int(self.prompt_lengths[sequence])
        base = min(int(self.base[sequence]), n)
        return n, base, min(self.window, base)

    def layer_weights(self, sequence: int) -> torch.Tensor:
        """How the total B·L is shared between the owner layers; uniform unless a policy says otherwise."""
        return torch.ones(len(self.owners))

    def counts(self, sequence: int) -> dict[int, int]:
        """Tokens (window included) each owner layer keeps for one sequence; they sum to B·L."""
        n, base, window = self.sequence_budget(sequence)
        return dict(zip(self.owners, apportion(self.layer_weights(sequence), base * len(self.owners), window, n)))

    def keep(self, cache, layer: int, counts: list[int]) -> None:
        kept = cache.keep_top(layer, self.scores[layer].pooled, counts, self.window)
        self.scores[layer].pooled = self.scores[layer].pooled.masked_fill(~kept, float("-inf"))

    def finish(self, cache) -> None:
        """After the last layer: cut every owner layer to its count."""
        batch = self.prompt_lengths.shape[0]
        per_layer = {owner: [] for owner in self.owners}
        for b in range(batch):
            for owner, count in self.counts(b).items():
                per_layer[owner].append(count)
        for owner in self.owners:
            self.keep(cache, owner, per_layer[owner])
