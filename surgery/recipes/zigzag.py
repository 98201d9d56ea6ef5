"""ZigZagKV (Zhong et al., arXiv 2412.09036): per-layer budgets from each layer's minimum attention budget (LMBA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from surgery.base.lazy import lazy_import
from surgery.recipes.base import CalibrationRequest
from surgery.recipes.budget import TokenBudgetRecipe
policies_surgery = lazy_import("surgery.arch.policies_surgery")

torch = lazy_import("torch")
if TYPE_CHECKING:
    from surgery.calibrate.layer_runner import LayerRunner


@dataclass
class ZigZagKV(TokenBudgetRecipe):
    name = "zigzag"
    policy = "zigzag"
    paper = "ZigZagKV: Dynamic KV Cache Compression for Long-context Modeling based on Layer Uncertainty (Zhong et al., arXiv 2412.09036)"
    saves = "KV cache tokens: layers that spread their attention keep more, the same total as SnapKV"

    calibrated: bool = field(default=False, metadata={"help": "also store a static layer allocation from calibration data", "flag": True})

    @property
    def calibration(self) -> CalibrationRequest | None:
        return CalibrationRequest(num_samples=16, seq_len=256) if self.calibrated else None

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        plan = super().plan(runner, calibration_ids, seed, progress)
        if self.calibrated:
            plan["layer_weights"] = self.layer_shares(runner)
        return plan

    @staticmethod
    def layer_shares(runner: LayerRunner) -> list[float]:
        """u_l = LMBA_l / Σ LMBA averaged over calibration samples, measured by the shipped scoring code: every
        batch's prefill, layer by layer, runs with a ZigZag policy object whose scores are read back."""

        config = runner.config
        owners = config.full_attention_owners
        policies = [policies_surgery.build_policy("zigzag", 0.5, None, owners, torch.full((len(batch),), batch.shape[1]), config.kv_window)
                    for batch in runner.batches]
        runner.run(runner.kv_source, commit=False, record=False, policies=policies)
        totals = torch.zeros(len(owners), dtype=torch.float64)
        for policy in policies:
            lmba = torch.stack([policy.lmba(layer) for layer in owners]).double()  # (layers, batch)
            totals += (lmba / lmba.sum(0)).sum(1)
        shares = totals / runner.ids.shape[0]
        weights = [0.0] * config.num_hidden_layers
        for layer, share in zip(owners, shares.tolist()):
            weights[layer] = round(share, 6)
        return weights
