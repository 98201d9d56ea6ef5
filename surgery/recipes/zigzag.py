"""ZigZagKV (Zhong et al., arXiv 2412.09036): per-layer budgets from each layer's minimum attention budget (LMBA)."""

from dataclasses import dataclass, field
from typing import Any

import torch

from .budget import TokenBudgetRecipe


@dataclass
class ZigZagKV(TokenBudgetRecipe):
    name = "zigzag"
    policy = "zigzag"
    paper = "ZigZagKV: Dynamic KV Cache Compression for Long-context Modeling based on Layer Uncertainty (Zhong et al., arXiv 2412.09036)"
    saves = "KV cache tokens: layers that spread their attention keep more, the same total as SnapKV"

    calibrated: bool = field(default=False, metadata={"help": "also store a static layer allocation from calibration data", "flag": True})

    @property
    def calibration(self):
        from .base import CalibrationRequest

        return CalibrationRequest(num_samples=16, seq_len=256) if self.calibrated else None

    @torch.no_grad()
    def plan(self, model, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        plan = super().plan(model, calibration_ids, seed, progress)
        if self.calibrated:
            plan["layer_weights"] = self.layer_shares(model, calibration_ids)
        return plan

    @staticmethod
    def layer_shares(model, ids: torch.Tensor) -> list[float]:
        """u_l = LMBA_l / Σ LMBA averaged over calibration samples, measured by the shipped scoring code."""
        previous = model.config.kv_policy
        model.config.kv_policy = "zigzag"
        try:
            owners = model.config.owner_layers
            totals = torch.zeros(len(owners), dtype=torch.float64)
            for sample in ids.split(1):
                model(sample, use_cache=True, kv_budget=0.5)
                lmba = torch.stack([model.model.last_budget_policy.scores[layer].lmba[0] for layer in owners]).double()
                totals += lmba / lmba.sum()
        finally:
            model.config.kv_policy = previous
        shares = totals / ids.shape[0]
        weights = [0.0] * model.config.num_hidden_layers
        for layer, share in zip(owners, shares.tolist()):
            weights[layer] = round(share, 6)
        return weights
