"""PyramidKV (Cai et al., arXiv 2406.02069): budgets fall linearly with depth, from 2(B − w) − (B − w)/β to
(B − w)/β, plus the window w, with β = 20.

Shipped flat inside the checkpoints that evict with it.
"""

import torch

from .budget_surgery import BudgetPolicy
from .policies_surgery import PolicyRuntime

PYRAMID_BETA = 20


class PyramidKV(BudgetPolicy):
    name = "pyramid"
    default_window = 32

    def layer_weights(self, sequence: int) -> torch.Tensor:
        _, base, window = self.sequence_budget(sequence)
        layers = len(self.owners)
        low = (base - window) / PYRAMID_BETA
        high = 2 * (base - window) - low
        step = (high - low) / max(layers - 1, 1)
        return torch.tensor([high - i * step + window for i in range(layers)])


RUNTIME = PolicyRuntime(PyramidKV)
