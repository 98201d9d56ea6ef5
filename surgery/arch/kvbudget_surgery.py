"""Per-layer KV budgets: token eviction after prefill (SnapKV scoring; snapkv, pyramid, zigzag, dynamickv budgets).

Scoring, as in SnapKV: the last `window` prompt tokens are the observation window; the attention of the window
queries to the prefix keys is summed over the window queries, pooled along the sequence (kernel 7), and reduced per
KV head over its query heads. Each (sequence, layer, KV head) then keeps the window plus its top-scoring prefix
tokens; the policies differ only in how many tokens each layer keeps:

- snapkv: the same budget B in every layer.
- pyramid (PyramidKV, β = 20): budgets fall linearly with depth, from 2(B − w) − (B − w)/β to (B − w)/β, plus w.
- zigzag (ZigZagKV, arXiv 2412.09036): LMBA_l = tokens needed to reach 90% of the window-averaged attention mass,
  per head, averaged over heads; u_l = LMBA_l / Σ LMBA; B_l = B_min + (B − B_min)·L·u_l, B_min = 0.2·B, per prompt
  (or from calibration, `kv_layer_weights`).
- dynamickv (DynamicKV, arXiv 2412.14838): window 8; while its layer runs each layer keeps at most radio_max·B
  tokens; every m = 4 layers a global top-k over the pooled scores of the layers seen so far gives each a count,
  rescaled to a total of B·L, and earlier layers are cut to theirs. Window tokens are never duplicated and the
  cache stays per KV head (the official code expands it per query head).

Shipped flat inside every checkpoint: imports torch only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

POLICIES = ("snapkv", "pyramid", "zigzag", "dynamickv")
DEFAULT_WINDOW = {"snapkv": 32, "pyramid": 32, "zigzag": 32, "dynamickv": 8}
PYRAMID_BETA = 20
ZIGZAG_MASS = 0.9
ZIGZAG_MIN_FRACTION = 0.2
DYNAMIC_RADIO_MAX = 10
DYNAMIC_EVERY = 4


@dataclass
class LayerScores:
    """What one layer's prefill tells the policy: pooled prefix scores per KV head and its LMBA per sequence."""

    pooled: torch.Tensor  # (batch, kv_heads, prefix) float32, -inf on padding
    lmba: torch.Tensor  # (batch,) float32


def window_attention_sums(query: torch.Tensor, key: torch.Tensor, padding: torch.Tensor | None, window: int,
                          scaling: float) -> torch.Tensor:
    """(batch, heads, n): softmax attention of the last `window` queries to every key, summed over those queries.
    Only a window × n block of scores is ever formed."""
    n = query.shape[2]
    window = min(window, n)
    group = query.shape[1] // key.shape[1]
    logits = query[:, :, n - window :].float() @ key.float().repeat_interleave(group, dim=1).transpose(2, 3) * scaling
    allowed = torch.arange(n, device=query.device)[None, :] <= torch.arange(n - window, n, device=query.device)[:, None]
    allowed = allowed[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, :n].bool()
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1).sum(2)


def scores_from_sums(sums: torch.Tensor, kv_heads: int, padding: torch.Tensor | None, window: int,
                     kernel: int = 7, pooling: str = "avg") -> LayerScores:
    """SnapKV scores (pooled prefix sums, averaged per KV head) and ZigZagKV's LMBA from the window sums."""
    batch, heads, n = sums.shape
    window = min(window, n)
    lmba = tokens_to_reach(sums / window, ZIGZAG_MASS).float().mean(1)
    prefix = sums[..., : n - window]
    if prefix.shape[-1] > 0:
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        prefix = pool(prefix.flatten(0, 1)[:, None], kernel, stride=1, padding=kernel // 2)[:, 0].view(batch, heads, -1)
    pooled = prefix.view(batch, kv_heads, heads // kv_heads, -1).mean(2)
    if padding is not None:
        pooled = pooled.masked_fill(~padding[:, None, : n - window].bool(), float("-inf"))
    return LayerScores(pooled=pooled, lmba=lmba)


def window_scores(query: torch.Tensor, key: torch.Tensor, padding: torch.Tensor | None, window: int, scaling: float,
                  kernel: int = 7, pooling: str = "avg") -> LayerScores:
    """SnapKV scores from (batch, heads, n, d) queries and (batch, kv_heads, n, d) keys, both post-RoPE."""
    sums = window_attention_sums(query, key, padding, window, scaling)
    return scores_from_sums(sums, key.shape[1], padding, window, kernel, pooling)


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
    """Decides how many tokens each owner layer keeps; the cache does the gathering."""

    def __init__(self, name: str, budget: float | None, budget_tokens: int | None, owners: list[int],
                 prompt_lengths: torch.Tensor, window: int | None, layer_weights: list[float] | None = None,
                 pooling: str = "avg"):
        if name not in POLICIES:
            raise ValueError(f"unknown KV budget policy {name!r}; choose from {', '.join(POLICIES)}")
        self.name = name
        self.owners = owners
        self.window = window or DEFAULT_WINDOW[name]
        self.prompt_lengths = prompt_lengths  # (batch,) real tokens per sequence
        per_layer = prompt_lengths.double() * budget if budget_tokens is None else torch.full_like(
            prompt_lengths, budget_tokens, dtype=torch.float64)
        self.base = per_layer.round().long().clamp(min=1)  # B per sequence: average tokens kept per layer
        self.layer_weights = layer_weights
        self.pooling = pooling
        self.scores: dict[int, LayerScores] = {}

    def score(self, query: torch.Tensor, key: torch.Tensor, padding: torch.Tensor | None, scaling: float,
              sums: torch.Tensor | None = None) -> LayerScores:
        """Called by each K/V-owning layer during prefill, with its post-RoPE queries and keys, and the window
        sums when a prefill kernel already computed them."""
        if sums is None:
            sums = window_attention_sums(query, key, padding, self.window, scaling)
        return scores_from_sums(sums, key.shape[1], padding, self.window, pooling=self.pooling)

    def observe(self, layer: int, scores: LayerScores, cache) -> None:
        self.scores[layer] = scores
        if self.name == "dynamickv":
            self._dynamic_step(layer, cache)

    def counts(self, sequence: int) -> dict[int, int]:
        """Tokens (window included) each owner layer keeps for one sequence; they sum to B·L."""
        n = int(self.prompt_lengths[sequence])
        base = min(int(self.base[sequence]), n)
        window = min(self.window, base)
        layers = len(self.owners)
        total = base * layers
        if self.name == "snapkv":
            weights = torch.ones(layers)
        elif self.name == "pyramid":
            low = (base - window) / PYRAMID_BETA
            high = 2 * (base - window) - low
            step = (high - low) / max(layers - 1, 1)
            weights = torch.tensor([high - i * step + window for i in range(layers)])
        elif self.name == "zigzag":
            if self.layer_weights is not None:
                usage = torch.tensor([self.layer_weights[layer] for layer in self.owners])
            else:
                lmba = torch.stack([self.scores[layer].lmba[sequence] for layer in self.owners])
                usage = lmba / lmba.sum()
            minimum = ZIGZAG_MIN_FRACTION * base
            weights = minimum + (base - minimum) * layers * usage
        else:
            return dict(zip(self.owners, self._dynamic_counts(sequence, self.owners, total)))
        return dict(zip(self.owners, apportion(weights, total, window, n)))

    def _dynamic_counts(self, sequence: int, layers: list[int], total: int) -> list[int]:
        """Global top-k over the stacked pooled scores: each layer gets the window plus its share of the top-k."""
        n = int(self.prompt_lengths[sequence])
        window = min(self.window, int(self.base[sequence]), n)
        stacked = torch.cat([self.scores[layer].pooled[sequence].amax(0) for layer in layers])  # any head kept it
        prefix = self.scores[layers[0]].pooled.shape[-1]
        k = max(0, min(total - window * len(layers), int(torch.isfinite(stacked).sum())))
        chosen = torch.zeros(len(layers), dtype=torch.long)
        if k:
            top = stacked.topk(k).indices // prefix
            chosen = torch.bincount(top, minlength=len(layers))
        return [window + int(c) for c in chosen]

    def _dynamic_step(self, layer: int, cache) -> None:
        """DynamicKV during prefill: cap this layer at radio_max·B; every m layers cut the earlier ones to their
        count from a global top-k rescaled to the full total B·L."""
        seen = [owner for owner in self.owners if owner in self.scores]
        batch = self.prompt_lengths.shape[0]
        cap = [min(int(self.prompt_lengths[b]), DYNAMIC_RADIO_MAX * int(self.base[b])) for b in range(batch)]
        self._keep(cache, layer, cap)
        if len(seen) % DYNAMIC_EVERY or len(seen) == len(self.owners):
            return
        per_layer = {owner: [] for owner in seen}
        scale = len(self.owners) / len(seen)
        for b in range(batch):
            total = round(int(self.base[b]) * len(seen))
            for owner, count in zip(seen, self._dynamic_counts(b, seen, total)):
                per_layer[owner].append(min(int(self.prompt_lengths[b]), round(count * scale)))
        for owner in seen:
            self._keep(cache, owner, per_layer[owner])

    def _keep(self, cache, layer: int, counts: list[int]) -> None:
        kept = cache.keep_top(layer, self.scores[layer].pooled, counts, self.window)
        self.scores[layer].pooled = self.scores[layer].pooled.masked_fill(~kept, float("-inf"))

    def finish(self, cache) -> None:
        batch = self.prompt_lengths.shape[0]
        per_layer = {owner: [] for owner in self.owners}
        for b in range(batch):
            for owner, count in self.counts(b).items():
                per_layer[owner].append(count)
        for owner in self.owners:
            self._keep(cache, owner, per_layer[owner])
