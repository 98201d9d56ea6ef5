"""StreamingLLM (Xiao et al., Efficient Streaming Language Models with Attention Sinks, arXiv 2309.17453): every
layer keeps the first `sinks` tokens (the attention sinks, 4 in the paper) and the most recent ones, the same
number in every layer. Nothing is scored: which tokens stay depends only on their positions.

The paper evicts while decoding, one token out as each comes in, so its cache never exceeds sinks + window. Here,
as with the other policies, the cut happens once after the prefill (to the budget's sinks + recent tokens) and the
decoded tokens are then all kept; a prompt of n tokens followed by g generated ones holds B + g per layer.

Shipped flat inside the checkpoints that evict with it.
"""

import torch

from .budget_surgery import BudgetPolicy, LayerScores
from .policies_surgery import PolicyRuntime

STREAMING_SINKS = 4


class SinksAndRecentScorer:
    """Scores that rank the first `sinks` real tokens of each sequence above all others, then the later ones by
    recency; the cache keeps the top of this order, so a layer holds the sinks and its most recent tokens."""

    def __init__(self, window: int, sinks: int = STREAMING_SINKS):
        self.window, self.sinks = window, sinks

    def __call__(self, query, key, padding, scaling, lse=None, softcap=None) -> LayerScores:
        batch, kv_heads, n = key.shape[0], key.shape[1], key.shape[2]
        prefix = max(n - min(self.window, n), 0)
        positions = torch.arange(prefix, device=key.device, dtype=torch.float32).expand(batch, prefix)
        first = torch.zeros(batch, 1, device=key.device)
        if padding is not None:
            real = padding[:, :n].bool()
            first = real.float().argmax(-1, keepdim=True).float()  # left padding: the first real token
        pooled = torch.where(positions - first < self.sinks, positions + n, positions)  # sinks outrank recency
        if padding is not None:
            pooled = pooled.masked_fill(~real[:, :prefix], float("-inf"))
        pooled = pooled[:, None].expand(batch, kv_heads, prefix).contiguous()
        return LayerScores(pooled=pooled, mass=pooled.new_zeros(batch, 1, n))


class StreamingLLM(BudgetPolicy):
    """The always-kept window is one token: the scores already put the sinks first and then every token by
    recency, so a wider window would only take the sinks' place when the budget is small."""

    name = "streamingllm"
    default_window = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scorer = SinksAndRecentScorer(self.window)


RUNTIME = PolicyRuntime(StreamingLLM)
