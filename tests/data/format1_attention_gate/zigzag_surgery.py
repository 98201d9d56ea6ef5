"""ZigZagKV (Zhong et al., arXiv 2412.09036): budgets follow each layer's uncertainty.

LMBA_l = the tokens needed to reach 90% of the window-averaged attention mass, per head, averaged over heads;
u_l = LMBA_l / Σ LMBA; B_l = B_min + (B − B_min)·L·u_l with B_min = 0.2·B, per prompt, or from calibration
(`kv_layer_weights`, the u_l averaged over calibration prompts).

Shipped flat inside every checkpoint.
"""

import torch

from .budget_surgery import BudgetPolicy, tokens_to_reach

ZIGZAG_MASS = 0.9
ZIGZAG_MIN_FRACTION = 0.2


class ZigZagKV(BudgetPolicy):
    name = "zigzag"
    default_window = 32

    def lmba(self, layer: int) -> torch.Tensor:
        """(batch,) minimum budget for 90% of the attention mass of `layer`, averaged over its query heads."""
        return tokens_to_reach(self.scores[layer].mass, ZIGZAG_MASS).float().mean(1)

    def usage(self, sequence: int) -> torch.Tensor:
        if self.calibrated_weights is not None:
            return torch.tensor([self.calibrated_weights[layer] for layer in self.owners])
        lmba = torch.stack([self.lmba(layer)[sequence] for layer in self.owners])
        return lmba / lmba.sum()

    def layer_weights(self, sequence: int) -> torch.Tensor:
        _, base, _ = self.sequence_budget(sequence)
        minimum = ZIGZAG_MIN_FRACTION * base
        return minimum + (base - minimum) * len(self.owners) * self.usage(sequence)
