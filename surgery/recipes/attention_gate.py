"""Attention-Gate (Zeng et al., arXiv 2410.12876): learned in-context KV eviction.

Conversion adds one small gate per K/V-owning layer (`arch/attention_gate_surgery.py`), initialised to keep every token, so
the converted model computes exactly what the source computes. `surgery adapt` then trains the gates alone, the
base frozen: distillation from the source plus a regulariser that pulls each layer's mean keep rate towards
`--target-keep`. The flags are hard in the forward pass and straight-through (the soft probability) backward.

Choices where the paper leaves room or where this project deviates:
- The gate is causal; the paper's reads the whole context. A causal gate flags each decoded token as it arrives,
  and cached decoding agrees with a full forward.
- Initialisation keeps everything (output weight 0, bias +1: p = 0.73 ≥ τ for every token), rather than imitating
  a heuristic such as SnapKV: SnapKV scores a token by the attention of queries that come after it, which a causal
  gate cannot see, and keep-all makes the untrained checkpoint equal to the source (a test checks it).
- The regulariser is λ·(rate − target)² per (layer, KV head), averaged: per layer, a 3-head layer met the target
  by switching one head off. The paper's is linear in the keep rate, which has no minimum at the target: it pushes
  towards evicting everything until distillation pushes back.
  λ = 10 by default: at λ = 1 on the demo model, 75 steps of distillation held the gates near keeping everything
  (97.7% kept, measured at 1k tokens), as the KL of evicting outweighed the regulariser.
- In training the flags are drawn, not thresholded: keep = logit + u ≥ logit(τ), u ~ Logistic(0, 1) (`flag_noise`),
  so a token is kept with probability σ(logit) at τ = 0.5. Deterministic flags of a fresh gate (one logit for every
  token) made whole layers cross the threshold together. The README has the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.errors import SurgeryError
from surgery.base.lazy import lazy_import
from surgery.recipes.base import Recipe, every_layer_slides

torch = lazy_import("torch")

if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig

GATE_MODULE = ".self_attn.gate."
EVICTION = "an Attention-Gate already decides which tokens leave the cache; a model evicts with one method"


@dataclass
class AttentionGateRecipe(Recipe):
    name: ClassVar[str] = "attention-gate"
    paper: ClassVar[str] = "Zeng et al., In-context KV-Cache Eviction for LLMs via Attention-Gate (arXiv 2410.12876)"
    saves: ClassVar[str] = "KV cache: each layer keeps, per KV head, only the tokens its learned gate flags to keep"
    milder: ClassVar[str] = "a larger --target-keep, or more `surgery adapt` steps"
    distill_alpha: ClassVar[float] = 1.0  # distillation from the source; the base model is frozen
    adapt_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-2, "seq_len": 1024, "batch_size": 1}
    excludes: ClassVar[dict[str, str]] = {
        "pod": "PoD's upper layers read the bottom layer's keys of tokens a gate may have evicted",
    }
    excludes_eviction: ClassVar[str] = EVICTION

    target_keep: float = field(default=0.3, metadata={"help": "keep rate the training regulariser pulls each layer towards", "above": 0, "max": 1})
    gate_heads: int = field(default=1, metadata={"help": "attention heads of each gate", "min": 1})
    gate_width: int | None = field(default=None, metadata={"help": "width of each gate head (default: head_dim / 8)", "min": 1})
    gate_threshold: float = field(default=0.5, metadata={"help": "a token is kept when its keep probability is at least this", "above": 0, "below": 1})
    rate_weight: float = field(default=10.0, metadata={"help": "λ of the regulariser λ·(keep rate − target)²", "min": 0})
    flag_noise: float = field(default=1.0, metadata={"help": "training only: scale of the logistic noise added to the gate logits before the threshold (0: none)", "min": 0})
    open_bias: float = field(default=1.0, metadata={"help": "initial gate logit: σ(bias) ≥ threshold keeps every token", "above": 0})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.seed = 0

    def validate(self, config: SurgeryConfig) -> None:
        if config.attention_gate_heads is not None:
            raise SurgeryError("the model already has Attention-Gates", hint="convert the original model instead")
        if config.kv_policy is not None:
            raise SurgeryError(f"the model already evicts with {config.kv_policy}", hint="convert the original model")
        if not config.full_attention_owners:
            raise every_layer_slides(config, "a gate would evict only inside that window")
        if self.gate_width is not None and self.gate_width > config.head_dim:
            raise SurgeryError(f"--gate-width {self.gate_width} is wider than a KV head ({config.head_dim}): a gate "
                               "should be small next to the attention it steers", hint=f"use at most {config.head_dim // 4}")
        if torch.sigmoid(torch.tensor(self.open_bias)) < self.gate_threshold:
            raise SurgeryError(f"--open-bias {self.open_bias} starts the gates below --gate-threshold {self.gate_threshold}, "
                               "evicting everything before training", hint="raise --open-bias or lower --gate-threshold")

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        return {"target_keep": self.target_keep, "heads": self.gate_heads, "width": self.gate_width,
                "threshold": self.gate_threshold, "seed": seed}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        width = plan["width"] or max(1, config.head_dim // 8)
        config.attention_gate_heads, config.attention_gate_width, config.attention_gate_threshold = plan["heads"], width, plan["threshold"]
        config.validate_architecture()
        inner = plan["heads"] * width
        self.seed = plan["seed"]
        self.shapes = {}
        for layer in config.full_attention_owners:  # a sliding layer keeps its window, ungated
            prefix = f"model.layers.{layer}{GATE_MODULE}"
            for part in ("query", "key", "value"):
                self.shapes[f"{prefix}{part}.weight"] = (inner, config.hidden_size)
            self.shapes[f"{prefix}out.weight"] = (config.num_key_value_heads, inner)
            self.shapes[f"{prefix}out.bias"] = (config.num_key_value_heads,)
        self.init_std = config.initializer_range

    def new_tensors(self) -> dict[str, torch.Tensor]:
        """Gate projections from N(0, initializer_range), seeded; the output layer keeps every token."""
        generator = torch.Generator().manual_seed(self.seed)
        tensors = {}
        for name, shape in self.shapes.items():
            if name.endswith("out.weight"):
                tensors[name] = torch.zeros(shape)
            elif name.endswith("out.bias"):
                tensors[name] = torch.full(shape, self.open_bias)
            else:
                tensors[name] = torch.randn(shape, generator=generator) * self.init_std
        return tensors

    def describe(self, plan: dict[str, Any]) -> list[str]:
        return [f"a causal gate per K/V-owning layer ({plan['heads']} head(s) of width {plan.get('width') or 'head_dim/8'}); "
                f"a token is kept while σ(gate) ≥ {plan['threshold']}",
                f"training target: keep {plan['target_keep']:.0%} of the tokens per layer (`surgery adapt`); "
                "untrained, the gates keep every token"]

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        """Only the gates; the base model stays frozen."""
        return GATE_MODULE in name

    def before_step(self, model, generator: torch.Generator) -> None:
        """Each gate draws this step's flag noise from its own seed (so a resumed run replays it exactly)."""
        for gate in self._gates(model):
            gate.noise = self.flag_noise
            gate.noise_seed = int(torch.randint(2**62, (1,), generator=generator))

    def finish_training(self, model) -> None:
        for gate in self._gates(model):
            gate.noise, gate.noise_seed = 0.0, None

    @staticmethod
    def _gates(model) -> list:
        return [layer.self_attn.gate for layer in model.model.layers if getattr(layer.self_attn, "gate", None) is not None]

    def regulariser(self, model):
        """λ·mean over gated layers of (straight-through keep rate − target)²."""
        rates = [gate.rate for gate in self._gates(model) if gate.rate is not None]
        if not rates:
            return None
        return self.rate_weight * (torch.cat([rate.reshape(-1) for rate in rates]) - self.target_keep).square().mean()
