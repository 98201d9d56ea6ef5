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
        """u_l = LMBA_l / Σ LMBA averaged over calibration samples, measured by the shipped scoring code: each
        sample's prefill runs with a ZigZag policy object, whose scores are read back from that same call."""
        from ..arch.policies_surgery import build_policy

        owners = model.config.owner_layers
        totals = torch.zeros(len(owners), dtype=torch.float64)
        for sample in ids.split(1):
            policy = build_policy("zigzag", 0.5, None, owners, torch.tensor([sample.shape[1]]), model.config.kv_window)
            model(sample, use_cache=True, kv_policy=policy)
            lmba = torch.stack([policy.lmba(layer)[0] for layer in owners]).double()
            totals += lmba / lmba.sum()
        shares = totals / ids.shape[0]
        weights = [0.0] * model.config.num_hidden_layers
        for layer, share in zip(owners, shares.tolist()):
            weights[layer] = round(share, 6)
        return weights
