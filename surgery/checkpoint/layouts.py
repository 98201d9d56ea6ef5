"""How a source checkpoint's tensor names map to the surgery architecture's: `LazyCheckpoint` presents every source
under the surgery names, so planning, the rewrite stage and teachers read one layout whatever the family saved; a
plain family checkpoint (depth growth, upcycling) is written back under the family's own names (`family_name`), with
the tensors the family's class holds and the surgery model does not (`family_extras`).

The dense families and the Qwen MoE families already use the surgery names (`mlp.gate`, `mlp.experts.{e}.
{gate,up,down}_proj`, `mlp.shared_expert*`). Mixtral saves its MoE as `block_sparse_moe.gate` and
`block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down). A checkpoint saved in transformers' fused in-memory
layout (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) is sliced per expert.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

MIXTRAL_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
MIXTRAL_ROUTER = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")
FUSED = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
SURGERY_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.(experts\.\d+\.)(gate_proj|up_proj|down_proj)(\.weight)$")
SURGERY_ROUTER = re.compile(r"^(model\.layers\.\d+)\.mlp\.gate\.weight$")


@dataclass(frozen=True)
class Alias:
    """A surgery-named tensor stored as `stored`, whole or as rows start:stop of one expert of a fused tensor."""

    stored: str
    expert: int | None = None
    start: int = 0
    stop: int | None = None

    def take(self, tensor):
        return tensor if self.expert is None else tensor[self.expert, self.start:self.stop].contiguous()

    def shape(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.expert is None:
            return stored_shape
        stop = stored_shape[1] if self.stop is None else self.stop
        return (stop - self.start, *stored_shape[2:])


def expert_name(layer: int | str, expert: int | str, projection: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def source_aliases(names: list[str], shape_of: Callable[[str], tuple[int, ...]]) -> dict[str, Alias]:
    """Surgery name → where the source stores it, for the tensors it stores under other names."""
    aliases = {}
    for name in names:
        if match := MIXTRAL_EXPERT.match(name):
            layer, expert, weight = match.groups()
            aliases[expert_name(layer, expert, MIXTRAL_NAMES[weight])] = Alias(name)
        elif match := MIXTRAL_ROUTER.match(name):
            aliases[f"model.layers.{match.group(1)}.mlp.gate.weight"] = Alias(name)
        elif match := FUSED.match(name):
            layer, kind = match.groups()
            experts, rows = shape_of(name)[:2]
            for expert in range(experts):
                if kind == "down_proj":
                    aliases[expert_name(layer, expert, "down_proj")] = Alias(name, expert)
                else:
                    aliases[expert_name(layer, expert, "gate_proj")] = Alias(name, expert, 0, rows // 2)
                    aliases[expert_name(layer, expert, "up_proj")] = Alias(name, expert, rows // 2, None)
    return aliases


def family_name(model_type: str, name: str) -> str:
    """The name the family saves a surgery-named tensor under (Mixtral: `block_sparse_moe`, w1/w3/w2)."""
    if model_type != "mixtral":
        return name
    if match := SURGERY_EXPERT.match(name):
        layer, expert, projection, suffix = match.groups()
        weight = {value: key for key, value in MIXTRAL_NAMES.items()}[projection]
        return f"{layer}.block_sparse_moe.{expert}{weight}{suffix}"
    if match := SURGERY_ROUTER.match(name):
        return f"{match.group(1)}.block_sparse_moe.gate.weight"
    return name


def family_extras(model_type: str, config) -> dict:
    """Tensors a plain checkpoint of `model_type` needs beyond the surgery model's (`config`): a Qwen2-MoE block
    without a shared expert still builds one, of width 0, with a gate, written as zeros (it scales nothing)."""
    import torch

    if model_type != "qwen2_moe" or config.moe_shared_intermediate_size or config.moe_layers is None:
        return {}
    hidden, extras = config.hidden_size, {}
    for layer in config.moe_layers:
        prefix = f"model.layers.{layer}.mlp.shared_expert"
        extras |= {f"{prefix}.gate_proj.weight": torch.zeros(0, hidden), f"{prefix}.up_proj.weight": torch.zeros(0, hidden),
                   f"{prefix}.down_proj.weight": torch.zeros(hidden, 0), f"{prefix}_gate.weight": torch.zeros(1, hidden)}
    return extras
