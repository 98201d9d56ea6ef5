"""What the four KV-budget recipes share: a token budget, baked into config.json as the default.

The eviction itself runs inside the shipped model (`arch/budget_surgery.py` and one file per policy) after each prefill, so a budget
can be overridden per call: `model.generate(ids, kv_budget=0.1)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.errors import SurgeryError
from surgery.recipes.base import Recipe, every_layer_slides

if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig

DEFAULT_KEEP = 0.2


@dataclass
class TokenBudgetRecipe(Recipe):
    policy: ClassVar[str]

    milder = "a larger --keep"
    renamed_options: ClassVar[dict[str, str | None]] = {"budget": "keep", "budget_tokens": "keep_tokens"}

    keep: float | None = field(default=None, metadata={"help": f"average fraction of the prompt's tokens each layer keeps (default {DEFAULT_KEEP})", "above": 0, "max": 1})
    keep_tokens: int | None = field(default=None, metadata={"help": "average number of prompt tokens each layer keeps, instead of --keep", "min": 1})
    keep_at_least: int = field(default=128, metadata={"help": "with --keep, a prompt of at most this many tokens stays whole, and each layer keeps at least this many on average (0: compress every prompt)", "min": 0})
    window: int | None = field(default=None, metadata={"help": "observation window (default: the policy's)", "min": 1})
    pooling: str = field(default="avg", metadata={"help": "1-D pooling of the scores (kernel 7)", "choices": ("avg", "max")})

    def validate(self, config: SurgeryConfig) -> None:
        if self.keep is not None and self.keep_tokens is not None:
            raise SurgeryError("--keep and --keep-tokens both given", hint="pass only one of them")
        if config.kv_policy is not None:
            raise SurgeryError(f"the model already evicts with {config.kv_policy}", hint="use one budget policy")
        if not config.full_attention_owners:
            raise every_layer_slides(config, "a token budget would evict only inside that window")

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        budget = DEFAULT_KEEP if self.keep is None and self.keep_tokens is None else self.keep
        return {"policy": self.policy, "budget": budget, "budget_tokens": self.keep_tokens,
                "min_tokens": self.keep_at_least if self.keep_tokens is None else None, "window": self.window,
                "pooling": self.pooling}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        config.kv_policy = plan["policy"]
        config.kv_budget = plan["budget"]
        config.kv_budget_tokens = plan["budget_tokens"]
        config.kv_min_tokens = plan.get("min_tokens")
        config.kv_window = plan["window"]
        config.kv_pooling = plan.get("pooling", "avg")
        config.kv_layer_weights = plan.get("layer_weights")

    def describe(self, plan: dict[str, Any]) -> list[str]:
        amount = f"{plan['budget_tokens']} tokens" if plan.get("budget_tokens") else f"{plan.get('budget', 0):.0%} of the prompt"
        floor = f" (at least {plan['min_tokens']} tokens: a shorter prompt stays whole)" if plan.get("min_tokens") else ""
        lines = [f"policy {plan.get('policy')}: each layer keeps {amount} on average after prefill{floor} "
                 "(override per call with generate(..., kv_budget=...))"]
        if plan.get("layer_weights"):
            lines.append("calibrated layer shares: " + ", ".join(f"{w:.3f}" for w in plan["layer_weights"]))
        return lines
