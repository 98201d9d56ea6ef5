"""DynamicKV (Zhou et al., arXiv 2412.14838): budgets decided while the prefill runs.

Window 8. While its layer runs, each layer keeps at most radio_max·B tokens (radio_max = 10); every m = 4 layers a
global top-k over the pooled scores of the layers seen so far gives each a count, rescaled to a total of B·L, and
earlier layers are cut to theirs. Window tokens are never duplicated and the cache stays per KV head (the
official code expands it per query head).

Shipped flat inside the checkpoints that evict with it.
"""

import torch

from .budget_surgery import BudgetPolicy
from .policies_surgery import PolicyRuntime

DYNAMIC_RADIO_MAX = 10
DYNAMIC_EVERY = 4


class DynamicKV(BudgetPolicy):
    name = "dynamickv"
    default_window = 8

    def top_k_counts(self, sequence: int, layers: list[int], total: int) -> list[int]:
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

    def counts(self, sequence: int) -> dict[int, int]:
        _, base, _ = self.sequence_budget(sequence)
        return dict(zip(self.owners, self.top_k_counts(sequence, self.owners, base * len(self.owners))))

    def observe(self, layer: int, cache) -> None:
        """Cap this layer at radio_max·B; every m layers cut the earlier ones to their count from a global top-k
        rescaled to the full total B·L."""
        seen = [owner for owner in self.owners if owner in self.scores]
        batch = self.prompt_lengths.shape[0]
        cap = [min(int(self.prompt_lengths[b]), DYNAMIC_RADIO_MAX * int(self.base[b])) for b in range(batch)]
        self.keep(cache, layer, cap)
        if len(seen) % DYNAMIC_EVERY or len(seen) == len(self.owners):
            return
        per_layer = {owner: [] for owner in seen}
        scale = len(self.owners) / len(seen)
        for b in range(batch):
            total = round(int(self.base[b]) * len(seen))
            for owner, count in zip(seen, self.top_k_counts(b, seen, total)):
                per_layer[owner].append(min(int(self.prompt_lengths[b]), round(count * scale)))
        for owner in seen:
            self.keep(cache, owner, per_layer[owner])


RUNTIME = PolicyRuntime(DynamicKV)
