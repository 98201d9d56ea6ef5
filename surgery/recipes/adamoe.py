"""AdaMoE (Zeng et al., AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language Models,
arXiv 2406.13233): m null experts join each router, so a token can spend fewer true experts than top-k.

- Null experts are m extra router rows after the E true ones, initialised, as in the paper, by repeating the true
  experts' rows (null j starts as a copy of row j mod E). top-k is raised (the paper: m = 16 and k = 4 for
  Mixtral's E = 8 and k = 2; the defaults here are m = 2E and k = 2 × the source's).
- Each true expert then ties with its copies. The routing gives ties to the true expert, explicitly (a stable
  sort; topk's order among equal values is implementation-defined, and the official code leaves it to topk), so
  the untrained model runs the source's top-k true experts for every token and computes the source exactly; any
  adaptivity is learnt. (Before this, which experts a token picked was decided by tie-breaking.)
- Routing (`arch/mlp_surgery.py`): softmax over all E + m logits, top-k; the chosen true experts' weights are
  renormalised to sum 1; a null expert outputs zero and is never dispatched to, so it costs nothing, and a token
  that chose only null experts gets a zero MLP update.
- Training (`surgery adapt`): the language-model loss plus `--balance-coef` (the paper's 1e-4 for Mixtral) × the
  load-balancing loss over E + m experts with the null experts' counts replaced by their mean (`balance.py`, where
  the deviation of the official code is noted). `--moe-train` picks the routers alone or the routers and the experts.

With m = 0 and the source's top-k, the model is the source.
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


def with_null_rows(null_experts: int):
    """A build function: the router with `null_experts` more rows, repeating the true experts' rows in order."""
    def build(router):
        repeats = -(-null_experts // router.shape[0])
        return torch.cat([router, router.repeat(repeats, 1)[:null_experts]])
    return build


@dataclass
class AdaMoE(ExpertTraining):
    name: ClassVar[str] = "adamoe"
    paper: ClassVar[str] = ("Zeng et al., AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts "
                            "Language Models (arXiv 2406.13233)")
    saves: ClassVar[str] = "MLP compute: a token that picks null experts runs fewer true experts (0 to k)"
    distill_alpha: ClassVar[float] = 0.0  # fine-tuning with the language-model loss, as in the paper
    adapt_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "seq_len": 512, "batch_size": 2}
    milder: ClassVar[str] = "fewer --null-experts, a smaller --top-k, or more `surgery adapt` steps"
    default_train: ClassVar[str] = "experts"
    default_balance_coef: ClassVar[float] = 1e-4  # the paper's, for Mixtral

    null_experts: int | None = field(default=None, metadata={"help": "null experts per MoE layer, m (default: 2 × the true experts, the paper's 16 for 8)", "min": 0})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers: list[int] = []
        self.added = 0

    def choices(self, config: SurgeryConfig) -> tuple[int, int]:
        """(m, k) for this model: the options, or the paper's doubling of the experts and of top-k."""
        if config.moe_layers is None:
            raise SurgeryError("AdaMoE adds null experts to mixtures of experts, and the model has none",
                               hint="convert an MoE model (mixtral, qwen2_moe, qwen3_moe), or upcycle a dense one "
                                    "first: --recipe upcycle,adamoe")
        null = 2 * config.moe_experts if self.null_experts is None else self.null_experts
        top_k = 2 * config.moe_top_k if self.top_k is None else self.top_k
        if top_k > config.moe_experts + null:
            raise SurgeryError(f"top-k {top_k} is more than the {config.moe_experts} experts and {null} null experts",
                               hint="lower --top-k or add --null-experts")
        return null, top_k

    def validate(self, config: SurgeryConfig) -> None:
        if config.adamoe_null_experts:
            raise SurgeryError("the model already has null experts", hint="convert the original model instead")
        if config.moe_layers is not None:  # else an earlier recipe (upcycle) may add experts: checked when planning
            self.choices(config)

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        null, top_k = self.choices(runner.config)
        return {"null_experts": null, "top_k": top_k, "source_top_k": runner.config.moe_top_k}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        self.layers, self.added = list(config.moe_layers or []), plan["null_experts"]
        config.adamoe_null_experts, config.moe_top_k = plan["null_experts"], plan["top_k"]
        if self.added:
            config.moe_norm_topk = True  # the true experts' weights sum to 1, whatever the family did
        config.validate_architecture()

    def rewrite(self, plan: TensorPlan) -> None:
        if self.added:
            for layer in self.layers:
                router = f"model.layers.{layer}.mlp.gate.weight"
                plan.derive_from(router, router, with_null_rows(self.added))

    def describe(self, plan: dict[str, Any]) -> list[str]:
        return [f"{plan['null_experts']} null experts per MoE layer (router rows initialised by repeating the true "
                f"experts'), top-{plan['top_k']} over true and null experts (was top-{plan['source_top_k']}); the "
                "chosen true experts' weights are renormalised, null experts compute nothing"]
