"""What the mixture-of-experts recipes (upcycle, adamoe) share: top-k, which weights `surgery adapt` trains
(`--moe-train`) and the load-balancing loss it adds (`--balance-coef`, `balance.py`). Each option is declared once,
here; a recipe gives its own default where the user gives none."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from surgery.base.lazy import lazy_import
from surgery.recipes.base import Recipe
from surgery.recipes.growth import layer_of
balance = lazy_import("surgery.train.balance")

if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig

ROUTER = ".mlp.gate.weight"


def is_router(name: str) -> bool:
    return name.endswith(ROUTER)


@dataclass
class ExpertTraining(Recipe):
    """A subclass sets its defaults: `default_train` and `default_balance_coef`."""

    default_train: ClassVar[str] = "experts"
    default_balance_coef: ClassVar[float] = 0.0

    top_k: int | None = field(default=None, metadata={"help": "experts each token picks, true or null (default: upcycle 2; adamoe 2 × the source's, the paper's 4 for 2)", "min": 1})
    moe_train: str | None = field(default=None, metadata={"help": "what `surgery adapt` trains: all weights, experts (the routers and experts of the MoE layers) or routers (default: upcycle all, as its paper; adamoe experts)", "choices": ("all", "experts", "routers")})
    balance_coef: float | None = field(default=None, metadata={"help": "weight of the load-balancing loss in `surgery adapt` (default: upcycle 0.01, Switch Transformer's; adamoe 1e-4, its paper's for Mixtral)", "min": 0})

    @property
    def trains(self) -> str:
        return self.moe_train or self.default_train

    @property
    def balance_weight(self) -> float:
        return self.default_balance_coef if self.balance_coef is None else self.balance_coef

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        if self.trains == "all":
            return True
        if self.trains == "routers":
            return is_router(name)
        return (is_router(name) or ".mlp.experts." in name) and layer_of(name) in (config.moe_layers or ())

    def regulariser(self, model):

        loss = balance.balance_loss(model)
        return None if loss is None or not self.balance_weight else self.balance_weight * loss
