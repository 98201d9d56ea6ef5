"""What the four KV-budget recipes share: a token budget, baked into config.json as the default.

The eviction itself runs inside the shipped model (`arch/budget_surgery.py` and one file per policy) after each prefill, so a budget
can be overridden per call: `model.generate(ids, kv_budget=0.1)`.
"""

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..arch.configuration_surgery import SurgeryConfig
from ..errors import SurgeryError
from .base import Recipe


@dataclass
class TokenBudgetRecipe(Recipe):
    policy: ClassVar[str]

    budget: float | None = field(default=None, metadata={"help": "fraction of the prompt each layer keeps on average (default 0.2); for matryoshka: of the KV bytes", "above": 0, "max": 1})
    budget_tokens: int | None = field(default=None, metadata={"help": "tokens each layer keeps on average, instead of --budget", "min": 1})
    window: int | None = field(default=None, metadata={"help": "observation window (default: the policy's)", "min": 1})
    pooling: str = field(default="avg", metadata={"help": "1-D pooling of the scores (kernel 7)", "choices": ("avg", "max")})

    def validate(self, config: SurgeryConfig) -> None:
        if self.budget is not None and self.budget_tokens is not None:
            raise SurgeryError("--budget and --budget-tokens both given", hint="pass only one of them")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise SurgeryError(f"--budget must be in (0, 1], got {self.budget}")
        if self.budget_tokens is not None and self.budget_tokens < 1:
            raise SurgeryError(f"--budget-tokens must be positive, got {self.budget_tokens}")
        if config.kv_policy is not None:
            raise SurgeryError(f"the model already evicts with {config.kv_policy}", hint="use one budget policy")

    def plan(self, model, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        budget = 0.2 if self.budget is None and self.budget_tokens is None else self.budget
        return {"policy": self.policy, "budget": budget, "budget_tokens": self.budget_tokens, "window": self.window,
                "pooling": self.pooling}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        config.kv_policy = plan["policy"]
        config.kv_budget = plan["budget"]
        config.kv_budget_tokens = plan["budget_tokens"]
        config.kv_window = plan["window"]
        config.kv_pooling = plan.get("pooling", "avg")
        config.kv_layer_weights = plan.get("layer_weights")

    def describe(self, plan: dict[str, Any]) -> list[str]:
        amount = f"{plan['budget_tokens']} tokens" if plan.get("budget_tokens") else f"{plan.get('budget', 0):.0%} of the prompt"
        lines = [f"policy {plan.get('policy')}: each layer keeps {amount} on average after prefill "
                 "(override per call with generate(..., kv_budget=...))"]
        if plan.get("layer_weights"):
            lines.append("calibrated layer shares: " + ", ".join(f"{w:.3f}" for w in plan["layer_weights"]))
        return lines
