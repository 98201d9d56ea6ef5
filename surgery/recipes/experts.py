"""What the mixture-of-experts recipes (upcycle, adamoe) share: which weights `surgery adapt` trains (`--train`) and
the load-balancing loss it adds (`--balance-coef`, `balance.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import Recipe
from .growth import layer_of

if TYPE_CHECKING:
    from ..arch.configuration_surgery import SurgeryConfig

ROUTER = ".mlp.gate.weight"


def is_router(name: str) -> bool:
    return name.endswith(ROUTER)


@dataclass
class ExpertTraining(Recipe):
    """A subclass declares `train` (all, experts: the routers and experts of the MoE layers, or routers) and
    `balance_coef`."""

    train: str = "experts"
    balance_coef: float = 0.0

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        if self.train == "all":
            return True
        if self.train == "routers":
            return is_router(name)
        return (is_router(name) or ".mlp.experts." in name) and layer_of(name) in (config.moe_layers or ())

    def regulariser(self, model):
        from ..balance import balance_loss

        loss = balance_loss(model)
        return None if loss is None or not self.balance_coef else self.balance_coef * loss
