"""Depth growth, shared by LESA (`lesa.py`) and its baselines (`depth_up.py`): where the new layers go, how the
grown model's tensors come from the source's, and what `surgery adapt` trains.

The grown model is a plain checkpoint of the source family with more layers (no remote code) unless later
recipes rewrite its attention; they plan on the grown model, so growth comes first in a composition.

A layout lists the grown model's layers in order, each ("keep", i): source layer i (renamed to its new index), or
("new", i): a new layer between source layers i and i + 1, which the method builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.errors import SurgeryError
from surgery.base.lazy import lazy_import
from surgery.recipes.base import Recipe
export = lazy_import("surgery.checkpoint.export")

torch = lazy_import("torch")

if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig
    from surgery.checkpoint.rewrite import TensorPlan

Layout = list[tuple[str, int]]
# A block's norms (Gemma's sandwich norms included), which LESA's `--norms first` copies from layer 0.
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
         "post_feedforward_layernorm.weight")


def layer_name(index: int, suffix: str) -> str:
    return f"model.layers.{index}.{suffix}"


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to ("model.layers.7.mlp.up_proj.weight" → 7), or None."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def spread(gaps: list[int], count: int) -> list[int]:
    """`count` of the gaps, evenly spread from the first to the last."""
    if count == len(gaps):
        return list(gaps)
    if count == 1:
        return [gaps[len(gaps) // 2]]
    return [gaps[round(k * (len(gaps) - 1) / (count - 1))] for k in range(count)]


def interleave(num_layers: int, gaps: list[int]) -> Layout:
    """Source layers in order, a new layer after each source layer i in `gaps`."""
    chosen = set(gaps)
    layout: Layout = []
    for layer in range(num_layers):
        layout.append(("keep", layer))
        if layer in chosen:
            layout.append(("new", layer))
    return layout


@dataclass
class GrowthRecipe(Recipe):
    """Options and layout shared by the depth-growth methods; a subclass says how a new layer's tensors are made
    (`build_new_layer`) and what trains."""

    keeps_family: ClassVar[bool] = True
    distill_alpha: ClassVar[float] = 0.0  # continual pre-training: the plain language-model loss
    adapt_defaults: ClassVar[dict[str, Any]] = {"lr": 3e-4, "seq_len": 512, "batch_size": 4}
    milder: ClassVar[str] = "more `surgery adapt` steps"

    target_layers: int | None = field(default=None, metadata={"help": "layers of the grown model (default: --depth-ratio × the source's)", "min": 1})
    depth_ratio: float | None = field(default=None, metadata={"help": "grown layers / source layers, when --target-layers is not given [1.5] (--ratio is KVSharer's)", "min": 1})
    insert_range: str | None = field(default=None, metadata={"help": "A:B: new layers go after source layers A..B-1, each between a layer and the next (default: the upper half)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.suffixes: dict[int, list[str]] = {}
        self.layout: Layout = []

    def target(self, num_layers: int) -> int:
        if self.target_layers is not None:
            return self.target_layers
        return round(num_layers * (1.5 if self.depth_ratio is None else self.depth_ratio))

    def gaps(self, num_layers: int) -> list[int]:
        """The source layers a new layer may follow (never the last: a new layer sits between two)."""
        if self.insert_range is None:
            return list(range(num_layers // 2 - 1, num_layers - 1))
        try:
            start, stop = (int(part) for part in str(self.insert_range).split(":"))
        except ValueError:
            raise SurgeryError(f"--insert-range {self.insert_range!r} is not A:B", hint="e.g. --insert-range 14:29") from None
        if not 0 <= start < stop <= num_layers - 1:
            raise SurgeryError(f"--insert-range {self.insert_range} is not within 0:{num_layers - 1}",
                               hint=f"new layers sit between two of the {num_layers} layers: A < B ≤ {num_layers - 1}")
        return list(range(start, stop))

    def make_layout(self, num_layers: int) -> Layout:
        """New layers after the chosen gaps, one per gap, spread evenly over the range."""
        added = self.target(num_layers) - num_layers
        gaps = self.gaps(num_layers)
        if added > len(gaps):
            raise SurgeryError(f"{added} new layers do not fit in the {len(gaps)} gaps of the insertion range "
                               "(one new layer between two layers)",
                               hint=f"ask for at most {num_layers + len(gaps)} layers, or widen --insert-range")
        return interleave(num_layers, spread(gaps, added) if added else [])

    def validate(self, config: SurgeryConfig) -> None:
        if config.grown_layers is not None:
            raise SurgeryError("the model was already grown", hint="grow the original model once, to the depth you want")
        if self.target(config.num_hidden_layers) < config.num_hidden_layers:
            raise SurgeryError(f"--target-layers {self.target(config.num_hidden_layers)} is fewer than the source's "
                               f"{config.num_hidden_layers} layers", hint="depth growth adds layers; pick a larger target")
        self.make_layout(config.num_hidden_layers)

    def new_layers(self, layout: Layout) -> list[int]:
        return [index for index, (kind, _) in enumerate(layout) if kind == "new"]

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        layout = self.make_layout(runner.config.num_hidden_layers)
        return {"layout": [list(slot) for slot in layout], "new_layers": self.new_layers(layout),
                "source_layers": runner.config.num_hidden_layers}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:

        self.suffixes = {}  # source layer -> its tensors' names within the layer (dense and MoE layers differ)
        for name in export.expected_tensors(config):
            if (layer := layer_of(name)) is not None:
                self.suffixes.setdefault(layer, []).append(name.split(".", 3)[3])
        self.layout = [(kind, int(layer)) for kind, layer in plan["layout"]]
        config.layer_types = [config.layer_types[layer] for _, layer in self.layout]
        if config.moe_layers is not None:  # a new layer has the MLP kind of the layer it is made from
            config.moe_layers = [index for index, (_, layer) in enumerate(self.layout) if layer in config.moe_layers]
        config.num_hidden_layers = len(self.layout)
        config.kv_source = list(range(config.num_hidden_layers))
        config.grown_layers = list(plan["new_layers"])
        config.validate_architecture()

    def rewrite(self, plan: TensorPlan) -> None:
        for index, (kind, layer) in enumerate(self.layout):
            for suffix in self.suffixes[layer]:
                if kind == "keep":
                    plan.rename(layer_name(index, suffix), layer_name(layer, suffix))
                else:
                    self.build_new_layer(plan, index, layer, suffix)
        super().rewrite(plan)

    def build_new_layer(self, plan: TensorPlan, index: int, lower: int, suffix: str) -> None:
        """Say how tensor `suffix` of new layer `index` (between source layers lower and lower + 1) is made."""
        raise NotImplementedError

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        """Only the inserted layers, the original ones frozen (the papers' continual pre-training)."""
        return layer_of(name) in (config.grown_layers or ())

    def describe(self, plan: dict[str, Any]) -> list[str]:
        new = plan["new_layers"]
        return [f"grown from {plan['source_layers']} to {len(plan['layout'])} layers: new layers at "
                f"{', '.join(map(str, new)) or 'none'}"]


def neighbour_mean(lower, upper):
    """A new layer's tensor as the mean of its two neighbours'."""
    return (lower.float() + upper.float()).div(2).to(lower.dtype)


def zeros_like(tensor):
    return torch.zeros_like(tensor)
