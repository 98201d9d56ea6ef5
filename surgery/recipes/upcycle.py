"""Sparse upcycling (Komatsuzaki et al., Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints,
arXiv 2212.05055): every other dense MLP becomes E experts, each a copy of it, behind a new router that picks top-k.

As in the paper, every other layer is upcycled (layers 1, 3, 5, ...; `--every`), the experts start as copies of the
dense MLP and the router is new (normal, std = the model's initializer_range). The top-k weights are renormalised
to sum 1, so with identical experts the upcycled model computes exactly what the dense model computes; a token's
update is Σ_k w_k · MLP(x) = MLP(x). Alone, the output is a plain checkpoint of the transformers MoE family that
keeps the source's attention (Qwen2-MoE for llama, mistral and qwen2, with no shared expert; Qwen3-MoE for qwen3),
which stock transformers loads without remote code.

How the experts come to differ (the paper leaves them identical and lets training split them): `surgery adapt`
continues training with the language-model loss plus the load-balancing loss (`--balance-coef`, `balance.py`).
Tokens the router sends to different experts give the copies different gradients from the first step, and the
router's own gradient, zero while the experts are equal, grows as they part. `--noise` adds Gaussian noise of that
relative size to each copy at conversion, which breaks the symmetry before training at the cost of exactness.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.errors import SurgeryError
from surgery.base.lazy import lazy_import
from surgery.recipes.experts import ExpertTraining

torch = lazy_import("torch")

if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig
    from surgery.checkpoint.rewrite import TensorPlan

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_copy(noise: float, seed: int):
    """A build function: the dense MLP weight, plus noise of relative size `noise` from its own seed."""
    def build(dense):
        if not noise:
            return dense.clone()
        generator = torch.Generator().manual_seed(seed)
        scale = noise * dense.float().std()
        return (dense.float() + scale * torch.randn(dense.shape, generator=generator)).to(dense.dtype)
    return build


@dataclass
class Upcycle(ExpertTraining):
    name: ClassVar[str] = "upcycle"
    paper: ClassVar[str] = ("Komatsuzaki et al., Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints "
                            "(arXiv 2212.05055)")
    saves: ClassVar[str] = ("nothing by itself: it turns dense MLPs into mixtures of experts (more parameters at "
                            "k × the MLP compute per token); the test bed for AdaMoE")
    keeps_family: ClassVar[bool] = True
    distill_alpha: ClassVar[float] = 0.0  # continued pre-training: the language-model loss
    adapt_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "seq_len": 512, "batch_size": 2}
    milder: ClassVar[str] = "more `surgery adapt` steps"
    default_train: ClassVar[str] = "all"  # the paper trains every weight
    default_balance_coef: ClassVar[float] = 0.01  # Switch Transformer's α

    experts: int = field(default=4, metadata={"help": "experts per upcycled MLP (E)", "min": 2})
    every: int = field(default=2, metadata={"help": "upcycle the MLP of every N-th layer (N-1, 2N-1, ...; 1: all)", "min": 1})
    noise: float = field(default=0.0, metadata={"help": "Gaussian noise added to each expert copy, relative to the weight's std (0: exact copies)", "min": 0})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers: list[int] = []
        self.seed = 0
        self.router_shape: tuple[int, int] = (0, 0)
        self.init_std = 0.02

    @property
    def k(self) -> int:
        return 2 if self.top_k is None else self.top_k

    def validate(self, config: SurgeryConfig) -> None:
        if config.moe_layers is not None:
            raise SurgeryError("the model already has mixtures of experts", hint="upcycle a dense model")
        if self.k > self.experts:
            raise SurgeryError(f"--top-k {self.k} is more than --experts {self.experts}",
                               hint="pick at most as many experts per token as there are")
        if self.every > config.num_hidden_layers:
            raise SurgeryError(f"--every {self.every} upcycles none of the {config.num_hidden_layers} layers",
                               hint=f"pick --every ≤ {config.num_hidden_layers}")
        if config.mlp_bias:
            raise SurgeryError("the source's MLP has biases, which no supported MoE family's experts have",
                               hint="upcycle a model without MLP biases")

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        layers = list(range(self.every - 1, runner.config.num_hidden_layers, self.every))
        return {"layers": layers, "experts": self.experts, "top_k": self.k, "seed": seed}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        self.layers, self.seed = list(plan["layers"]), int(plan["seed"])
        self.router_shape, self.init_std = (plan["experts"], config.hidden_size), config.initializer_range
        config.moe_layers, config.moe_experts, config.moe_top_k = self.layers, plan["experts"], plan["top_k"]
        config.moe_intermediate_size, config.moe_norm_topk = config.intermediate_size, True
        config.validate_architecture()

    def rewrite(self, plan: TensorPlan) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        for layer in self.layers:
            prefix = f"model.layers.{layer}.mlp"
            for expert in range(self.router_shape[0]):
                for index, projection in enumerate(PROJECTIONS):
                    seed = self.seed * 1_000_003 + (layer * self.router_shape[0] + expert) * 3 + index
                    plan.derive_from(f"{prefix}.experts.{expert}.{projection}.weight", f"{prefix}.{projection}.weight",
                                     expert_copy(self.noise, seed))
            plan.add(f"{prefix}.gate.weight", self.init_std * torch.randn(self.router_shape, generator=generator))

    def describe(self, plan: dict[str, Any]) -> list[str]:
        noise = f", plus {self.noise:g}× noise" if self.noise else " (exact copies: it computes what the source does)"
        return [f"upcycled the MLPs of layers {', '.join(map(str, plan['layers']))} into {plan['experts']} experts "
                f"each, top-{plan['top_k']} routing with renormalised weights; experts start as copies of the dense "
                f"MLP{noise}, routers are new"]
