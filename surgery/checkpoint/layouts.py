"""How a source checkpoint's tensor names map to the surgery architecture's: `LazyCheckpoint` presents every source
under the surgery names, so planning, the rewrite stage and teachers read one layout whatever the family saved; a
plain family checkpoint (depth growth, upcycling) is written back under the family's own names (`family_name`), with
the tensors the family's class holds and the surgery model does not (`family_extras`).

The dense families and the Qwen MoE families already use the surgery names (`mlp.gate`, `mlp.experts.{e}.
{gate,up,down}_proj`, `mlp.shared_expert*`). Mixtral saves its MoE as `block_sparse_moe.gate` and
`block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down). A checkpoint saved in transformers' fused in-memory
layout (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) is sliced per expert. Phi-3 fuses
`self_attn.qkv_proj` (q, k, v rows) and `mlp.gate_up_proj` (gate, up rows), sliced by rows; Gemma 3's image-text
checkpoints keep the language model under `model.language_model.` (or `language_model.model.`), whose vision tower
and projector the text-only surgery model does not read.
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
PHI3_FUSED = re.compile(r"^(model\.layers\.\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.weight$")
# (stored prefix, surgery prefix), the longest first: transformers 5.4 saves `model.language_model.model.`
LANGUAGE_MODEL = (("model.language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))


@dataclass(frozen=True)
class Alias:
    """A surgery-named tensor stored as `stored`: whole, or rows start:stop of it (of one expert's part when
    `expert` is set)."""

    stored: str
    expert: int | None = None
    start: int = 0
    stop: int | None = None

    @property
    def whole(self) -> bool:
        return self.expert is None and self.start == 0 and self.stop is None

    def take(self, tensor):
        if self.whole:
            return tensor
        part = tensor if self.expert is None else tensor[self.expert]
        return part[self.start:self.stop].contiguous()

    def shape(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.whole:
            return stored_shape
        rows = stored_shape if self.expert is None else stored_shape[1:]
        stop = rows[0] if self.stop is None else self.stop
        return (stop - self.start, *rows[1:])


def expert_name(layer: int | str, expert: int | str, projection: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def phi3_split(kind: str, rows: int, config: dict | None) -> list[tuple[str, int, int]]:
    """(surgery projection, first row, end row) of a Phi-3 fused weight: q, k, v by the head counts, or gate, up."""
    if kind == "mlp.gate_up_proj":
        return [("mlp.gate_proj", 0, rows // 2), ("mlp.up_proj", rows // 2, rows)]
    config = config or {}
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or rows // (heads + 2 * kv_heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    return [("self_attn.q_proj", 0, q), ("self_attn.k_proj", q, q + kv), ("self_attn.v_proj", q + kv, rows)]


def source_aliases(names: list[str], shape_of: Callable[[str], tuple[int, ...]],
                   config: dict | None = None) -> dict[str, Alias]:
    """Surgery name → where the source stores it, for the tensors it stores under other names; `config`: the
    source's config.json, for splits that depend on head counts."""
    aliases = {}
    for name in names:
        language = next((new + name[len(old):] for old, new in LANGUAGE_MODEL if name.startswith(old)), None)
        if language is not None:
            aliases[language] = Alias(name)
        elif match := PHI3_FUSED.match(name):
            prefix, kind = match.groups()
            for projection, start, stop in phi3_split(kind, shape_of(name)[0], config):
                aliases[f"{prefix}.{projection}.weight"] = Alias(name, None, start, stop)
        elif match := MIXTRAL_EXPERT.match(name):
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
