"""MoDification (Zhang et al., MoDification: Mixture of Depths Made Easy, arXiv 2410.14268): mixture-of-depths
routers with the threshold-p operator, added to a pretrained model and trained by distillation.

Conversion adds a router g = σ(w·x̂ + b) to every other layer (1, 3, 5, ...; `--route-layers` picks others). A
token with g ≥ p (`--route-threshold`, 0.5) goes through the layer, any other token skips it, computing nothing
there and leaving no K/V in its cache (`arch/modification_surgery.py`). `surgery adapt` then trains the routers alone,
the base frozen.

Choices where the paper leaves room or where this project deviates:
- The routed update is scaled by g / stopgrad(g), not g: 1 in value, g's gradient backward. Scaling by a fresh g
  ≈ 0.5 would halve every routed layer's contribution, and saturating the sigmoid to g ≈ 1 kills its gradient.
  With w = 0 and b = `--router-bias` (1: g = 0.73 ≥ p) the converted model routes every token and computes exactly
  what the source computes (tested against the family's transformers class).
- The router reads the layer's normalised input (its input RMSNorm's output), not the raw residual stream, whose
  scale grows with depth: one learning rate then suits every router.
- Training: the paper's R = α·Σ_j F_j·G_j (F_j the share of tokens layer j routes, hard; G_j its mean g; α =
  `--aux-alpha`, 0.01), plus λ·mean_j(skip_j − target)² towards `--skip` (λ = `--skip-weight`). A third-party
  reproduction found R alone drowned by the language-model loss (the model drifted back to dense); the bounded
  target penalty does not depend on that balance. skip_j's gradient is straight-through, that of 1 − G_j.
- What trains (`--train`): `routers` (the base frozen: the converted model stays a compressed source model, and
  training is cheap), or `layers`, the routers and every weight of the routed layers, at `--layer-lr-scale` × the
  routers' rate, so that a layer learns to work from the subset of tokens it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.errors import SurgeryError
from surgery.base.lazy import lazy_import
from surgery.recipes.base import Recipe, every_layer_slides
from surgery.recipes.growth import layer_of
from surgery.metrics.compute import routers as routers_of

torch = lazy_import("torch")

if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig

ROUTER_MODULE = ".router."
PARTIAL = "a routed layer's cache holds only the tokens it routed"


@dataclass
class MoDification(Recipe):
    name: ClassVar[str] = "modification"
    paper: ClassVar[str] = "Zhang et al., MoDification: Mixture of Depths Made Easy (arXiv 2410.14268)"
    saves: ClassVar[str] = ("compute and KV cache: a token a router skips costs nothing in that layer and leaves no "
                            "K/V there")
    milder: ClassVar[str] = "a smaller --skip, fewer --route-layers, or more `surgery adapt` steps"
    distill_alpha: ClassVar[float] = 1.0  # distillation from the source; the base model is frozen
    adapt_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-2, "seq_len": 512, "batch_size": 2}
    excludes: ClassVar[dict[str, str]] = {
        "kvsharer": f"{PARTIAL}, so it can neither lend its cache nor read another layer's",
        "pod": f"{PARTIAL}; PoD's upper layers read the bottom layer's keys of every distant token",
        "attention-gate": "routing is not combined with token eviction",
    }
    excludes_eviction: ClassVar[str] = "routing is not combined with token eviction"

    route_layers: str | None = field(default=None, metadata={"help": "comma-separated layers to route (default: every other layer: 1,3,5,...)"})
    route_threshold: float = field(default=0.5, metadata={"help": "a token goes through a routed layer when its router output g is at least this (p)", "above": 0, "below": 1})
    skip: float = field(default=0.25, metadata={"help": "training: share of tokens each routed layer should skip", "min": 0, "below": 1})
    skip_weight: float = field(default=10.0, metadata={"help": "λ of the penalty λ·(skip rate − --skip)² (0: the paper's regulariser alone)", "min": 0})
    aux_alpha: float = field(default=0.01, metadata={"help": "α of the paper's regulariser α·Σ F·G (0: off)", "min": 0})
    train: str = field(default="layers", metadata={"help": "what `surgery adapt` trains: routers, or the routers and the routed layers' weights", "choices": ("routers", "layers")})
    layer_lr_scale: float = field(default=0.01, metadata={"help": "with --train layers: the routed layers' learning rate as a multiple of the routers'", "above": 0})
    router_bias: float = field(default=1.0, metadata={"help": "initial router logit: σ(bias) ≥ --route-threshold routes every token", "above": 0})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shapes: dict[str, tuple[int, ...]] = {}

    def layers(self, config: SurgeryConfig) -> list[int]:
        """The routed layers: every other layer (1, 3, ...) by default, full-attention layers only (a sliding layer's
        cache already holds only its window)."""
        if self.route_layers is None:
            layers = [layer for layer in range(1, config.num_hidden_layers, 2) if not config.is_sliding(layer)]
            if not layers:
                raise every_layer_slides(config, "routing would skip tokens only inside that window") \
                    if not config.full_attention_owners else SurgeryError(
                        "no odd-numbered layer of this model attends to its whole context",
                        hint=f"name full-attention layers with --route-layers, e.g. {config.full_attention_owners[0]}")
            return layers
        try:
            layers = sorted({int(part) for part in str(self.route_layers).split(",") if part.strip()})
        except ValueError:
            raise SurgeryError(f"--route-layers {self.route_layers!r} is not a list of layer numbers",
                               hint="e.g. --route-layers 1,3,5") from None
        if not layers or layers[0] < 0 or layers[-1] >= config.num_hidden_layers:
            raise SurgeryError(f"--route-layers {self.route_layers} names no layer or one outside 0..{config.num_hidden_layers - 1}",
                               hint=f"pick layers between 0 and {config.num_hidden_layers - 1}")
        sliding = [layer for layer in layers if config.is_sliding(layer)]
        if sliding:
            raise SurgeryError(f"--route-layers names sliding-window layers ({', '.join(map(str, sliding))}), whose "
                               "cache already holds only their window",
                               hint="route full-attention layers: " + (", ".join(map(str, config.full_attention_owners))
                                                                     or "this model has none"))
        return layers

    def validate(self, config: SurgeryConfig) -> None:
        if config.modification_layers is not None:
            raise SurgeryError("the model already has mixture-of-depths routers", hint="convert the original model instead")
        if config.kv_policy is not None or config.attention_gate_heads is not None:
            raise SurgeryError("the model already evicts tokens; routing is not combined with eviction",
                               hint="convert the original model")
        self.layers(config)
        if torch.sigmoid(torch.tensor(self.router_bias)) < self.route_threshold:
            raise SurgeryError(f"--router-bias {self.router_bias} starts the routers below --route-threshold "
                               f"{self.route_threshold}, skipping every token before training",
                               hint="raise --router-bias or lower --route-threshold")

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        return {"threshold": self.route_threshold, "skip": self.skip, "layers": self.route_layers}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        config.modification_layers, config.modification_threshold = self.layers(config), plan["threshold"]
        config.validate_architecture()
        self.shapes = {}
        for layer in config.modification_layers:
            self.shapes[f"model.layers.{layer}{ROUTER_MODULE}proj.weight"] = (1, config.hidden_size)
            self.shapes[f"model.layers.{layer}{ROUTER_MODULE}proj.bias"] = (1,)

    def new_tensors(self) -> dict[str, torch.Tensor]:
        """Routers that route every token: w = 0, b = router_bias."""
        return {name: torch.zeros(shape) if name.endswith("weight") else torch.full(shape, self.router_bias)
                for name, shape in self.shapes.items()}

    def describe(self, plan: dict[str, Any]) -> list[str]:
        layers = f"layers {plan['layers']}" if plan.get("layers") else "every other layer (1, 3, 5, ...)"
        return [f"mixture-of-depths routers on {layers}; a token goes "
                f"through a routed layer while σ(router) ≥ {plan['threshold']}, else it skips it (no compute, no K/V)",
                f"training target: skip {plan['skip']:.0%} of the tokens per routed layer (`surgery adapt`); "
                "untrained, the routers route every token"]

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        """The routers, and with --train layers every weight of a routed layer."""
        return ROUTER_MODULE in name or (self.train == "layers" and layer_of(name) in (config.modification_layers or ()))

    def lr_scale(self, name: str) -> float:
        return 1.0 if ROUTER_MODULE in name else self.layer_lr_scale

    def regulariser(self, model):
        """α·Σ_j F_j·G_j (the paper's) + λ·mean_j(skip_j − target)², over the routers that ran this forward."""

        routers = [router for router in routers_of(model).values() if router.fraction is not None]
        if not routers:
            return None
        fractions = torch.stack([router.fraction for router in routers])
        means = torch.stack([router.mean for router in routers])
        loss = self.aux_alpha * (fractions.detach() * means).sum()
        return loss + self.skip_weight * ((1 - fractions) - self.skip).square().mean()
