"""H2O (Zhang et al., H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models, arXiv
2306.14048): each layer keeps, per KV head, the recent tokens and the "heavy hitters", the tokens with the largest
attention accumulated over every query of the prompt. The paper splits the budget evenly between the two; so does
this policy unless `window` (the recent part) is given.

The paper scores and evicts greedily at every decoding step; here the scores are accumulated over the whole prompt
during the prefill and the cut happens once, after it, as with the other policies. The accumulation runs in
chunks of query rows, so at most a chunk × n block of attention exists at a time, never the n × n matrix.

Shipped flat inside the checkpoints that evict with it.
"""

import torch

from .attention_surgery import soft_cap
from .budget_surgery import BudgetPolicy, LayerScores
from .policies_surgery import PolicyRuntime

H2O_CHUNK = 256


def accumulated_attention(query: torch.Tensor, key: torch.Tensor, padding: torch.Tensor | None, scaling: float,
                          chunk: int = H2O_CHUNK, softcap: float | None = None) -> torch.Tensor:
    """(batch, heads, n): Σ over the (real) queries of each one's causal softmax attention to every key, formed
    `chunk` query rows at a time."""
    batch, heads, n, _ = query.shape
    keys = key.float().repeat_interleave(heads // key.shape[1], dim=1).transpose(2, 3)
    real = None if padding is None else padding[:, :n].bool()
    total = query.new_zeros(batch, heads, n, dtype=torch.float32)
    columns = torch.arange(n, device=query.device)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=query.device)
        logits = soft_cap(query[:, :, rows].float() @ keys * scaling, softcap)
        allowed = (columns[None, :] <= rows[:, None])[None, None]
        if real is not None:
            allowed = allowed & real[:, None, None, :]
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        if real is not None:
            probs = probs * real[:, None, rows, None]  # a padding row gives nothing
        total += probs.sum(2)
    return total


class HeavyHitterScorer:
    """Accumulated attention per token, summed over the query heads of each KV head; the last `window` tokens are
    kept regardless, so only the earlier ones are ranked."""

    def __init__(self, window: int, chunk: int = H2O_CHUNK):
        self.window, self.chunk = window, chunk

    def __call__(self, query, key, padding, scaling, lse=None, softcap=None) -> LayerScores:
        sums = accumulated_attention(query, key, padding, scaling, self.chunk, softcap)
        batch, heads, n = sums.shape
        kv_heads = key.shape[1]
        prefix = n - min(self.window, n)
        pooled = sums[..., :prefix].reshape(batch, kv_heads, heads // kv_heads, prefix).sum(2)
        if padding is not None:
            pooled = pooled.masked_fill(~padding[:, None, :prefix].bool(), float("-inf"))
        return LayerScores(pooled=pooled, mass=sums / n)


class H2O(BudgetPolicy):
    name = "h2o"
    default_window = None  # half of each layer's budget, as the paper splits it

    def __init__(self, budget, budget_tokens, owners, prompt_lengths, window=None, *args, **kwargs):
        super().__init__(budget, budget_tokens, owners, prompt_lengths, window or 1, *args, **kwargs)
        if window is None:
            self.window = max(1, int(self.base.min()) // 2)
        self.scorer = HeavyHitterScorer(self.window)


RUNTIME = PolicyRuntime(H2O)
