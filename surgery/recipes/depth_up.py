"""Depth growth by copying layers: the baselines LESA is measured against (`--recipe depth-up --method ...`).

- `llama-pro` (Wu et al., LLaMA Pro: Progressive LLaMA with Block Expansion, arXiv 2401.02415): a new layer is a
  copy of the layer below it with o_proj and down_proj zeroed, so it starts as the identity (its residual updates
  are zero) and the grown model computes exactly what the source computes. Only the new layers train. Placed as
  the paper places them: the L layers split into n groups of L/n, one new layer after the top of each group (30 →
  45: after layers 1, 3, ..., 29, the last included), unless --insert-range says otherwise.
- `solar` (Kim et al., SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective Depth Up-Scaling,
  arXiv 2312.15166): the stack twice, the first copy without its last m₁ layers and the second without its first
  m₂, m₁ + m₂ = 2L − target (m₁ = ⌊·/2⌋: 7 and 8 for 30 → 45). Every weight trains, as in its paper.
- `copy`: a new layer is a plain copy of the layer below it. Only the new layers train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.errors import SurgeryError
from surgery.recipes.growth import GrowthRecipe, Layout, interleave, layer_name, zeros_like

if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig
    from surgery.checkpoint.rewrite import TensorPlan

METHODS = ("llama-pro", "solar", "copy")
def writes_residual(suffix: str) -> bool:
    """LLaMA-Pro zeroes what writes to the residual stream: o_proj and every down_proj (each expert's too)."""
    return suffix.startswith("self_attn.o_proj.") or ".down_proj." in f".{suffix}"


def llama_pro_gaps(num_layers: int, added: int) -> list[int]:
    """LLaMA-Pro's block expansion: n = `added` groups of L/n layers (rounded where n does not divide L), a new
    layer after the last layer of each group, the top layer's group included."""
    if not 0 <= added <= num_layers:
        raise SurgeryError(f"LLaMA-Pro adds at most one layer per source layer: {added} new for {num_layers}",
                           hint=f"ask for at most {2 * num_layers} layers")
    return [round((group + 1) * num_layers / added) - 1 for group in range(added)]


@dataclass
class DepthUp(GrowthRecipe):
    name: ClassVar[str] = "depth-up"
    paper: ClassVar[str] = ("LLaMA Pro (Wu et al., arXiv 2401.02415), SOLAR depth up-scaling (Kim et al., arXiv "
                            "2312.15166), or a plain copy")
    saves: ClassVar[str] = "nothing: grows the model in depth (the baselines of LESA)"
    excludes: ClassVar[dict[str, str]] = {"lesa": "both grow the model; grow it once"}

    method: str = field(default="llama-pro", metadata={"help": "how new layers are made: llama-pro (identity copies), solar (two overlapping stacks) or copy", "choices": METHODS})

    def make_layout(self, num_layers: int) -> Layout:
        if self.method == "llama-pro" and self.insert_range is None:
            added = self.target(num_layers) - num_layers
            return interleave(num_layers, llama_pro_gaps(num_layers, added))
        if self.method != "solar":
            return super().make_layout(num_layers)
        target = self.target(num_layers)
        if not num_layers <= target <= 2 * num_layers:
            raise SurgeryError(f"SOLAR builds {target} layers from two copies of {num_layers}",
                               hint=f"pick --target-layers between {num_layers} and {2 * num_layers}")
        if self.insert_range is not None:
            raise SurgeryError("--insert-range does not apply to --method solar (it drops layers where the stacks meet)",
                               hint="remove --insert-range")
        dropped = 2 * num_layers - target
        first, second = dropped // 2, dropped - dropped // 2
        return [("keep", i) for i in range(num_layers - first)] + [("keep", i) for i in range(second, num_layers)]

    def new_layers(self, layout: Layout) -> list[int]:
        if self.method != "solar":
            return super().new_layers(layout)
        return list(range(self._second_copy_start(layout), len(layout)))

    @staticmethod
    def _second_copy_start(layout: Layout) -> int:
        """Where the second stack begins: the first layer whose source index does not rise (none when the two
        stacks join without overlap, as at target = L)."""
        for index in range(1, len(layout)):
            if layout[index][1] <= layout[index - 1][1]:
                return index
        return len(layout)

    def build_new_layer(self, plan: TensorPlan, index: int, lower: int, suffix: str) -> None:
        source = layer_name(lower, suffix)
        if self.method == "llama-pro" and writes_residual(suffix):
            plan.derive(layer_name(index, suffix), [source], zeros_like)
        else:
            plan.rename(layer_name(index, suffix), source)

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        return self.method == "solar" or super().is_trainable(name, config)

    def describe(self, plan: dict[str, Any]) -> list[str]:
        how = {"llama-pro": "copies of the layer below with o_proj and down_proj zeroed (identity at start)",
               "solar": "two copies of the stack overlapping where they meet (SOLAR depth up-scaling)",
               "copy": "copies of the layer below"}[self.method]
        return [*super().describe(plan), f"new layers: {how}"]
