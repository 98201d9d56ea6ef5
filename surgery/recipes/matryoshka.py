"""MatryoshkaKV (Lin et al., arXiv 2410.14731): orthogonal per-KV-head projections that shrink the K/V cache.

Conversion:
1. PCA init: per layer and KV head, centre the post-RoPE keys (and the values) of the calibration set, take the
   covariance, `eigh` it and sort the eigenvectors by descending eigenvalue: U_K, U_V and the means μ_K, μ_V.
2. Ranks for a KV budget: start at full rank and greedily lower one (layer, head, K/V) rank by head_dim/8 at a
   time, the one whose output distribution moves least (KL against the unprojected model on calibration data,
   the paper's Algorithm 1), until the cache is at the budget. `--uniform` gives every head the same rank.
3. The checkpoint stores each basis truncated to its rank; `surgery adapt` then trains U (kept orthogonal) and μ
   with ranks sampled per step (Matryoshka training), the base model frozen.

Deviation, for speed: the paper rescores every candidate after every step (one forward pass per candidate per
step: about 180 × 700 passes for SmolLM2 at a 50% budget, hours on a CPU). Here each candidate's cost of each
step down is measured once, with every other head at full rank (a separable estimate: 7 passes per candidate),
and the greedy walk then takes the cheapest next step from those costs. The first step is exactly the paper's;
later steps ignore interactions between heads.
"""

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..arch.configuration_surgery import SurgeryConfig
from ..arch.projection_surgery import set_kv_ranks
from ..errors import SurgeryError
from .base import CalibrationRequest, Recipe

STEPS_PER_HEAD = 8  # ranks move in steps of head_dim / 8, as in the paper


@torch.no_grad()
def kv_covariances(model, ids: torch.Tensor, owners: list[int], batch_size: int) -> dict:
    """Per owner layer: sums, outer-product sums and counts of post-RoPE keys and of values, per KV head (float64)."""
    stats = {}
    for batch in ids.split(batch_size):
        cache = model(batch, use_cache=True).past_key_values
        for layer in owners:
            for kind, tensor in (("key", cache.layers[layer].keys), ("value", cache.layers[layer].values)):
                x = tensor.double().transpose(0, 1).flatten(1, 2)  # (kv_heads, tokens, head_dim)
                total, outer, count = stats.get((layer, kind), (0, 0, 0))
                stats[layer, kind] = (total + x.sum(1), outer + x.transpose(1, 2) @ x, count + x.shape[1])
    return stats


def principal_bases(total: torch.Tensor, outer: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means (heads, d) and eigenvector bases (heads, d, d), columns by descending eigenvalue of the covariance."""
    mean = total / count
    covariance = outer / count - mean[:, :, None] * mean[:, None, :]
    _, vectors = torch.linalg.eigh(covariance)
    return mean, vectors.flip(-1)


@torch.no_grad()
def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits.float().log_softmax(-1)


def kl_from(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over tokens of KL(reference ‖ candidate), both given as log-probabilities."""
    return (reference.exp() * (reference - candidate)).sum(-1).mean().item()


class CayleyRotation(nn.Module):
    """Training-time parametrisation W = (I + A)⁻¹(I − A)·W₀, A skew-symmetric: W keeps orthonormal columns.

    W₀ is the stored (head_dim × rank) basis; A starts at zero, so training starts from it exactly. (torch's
    `orthogonal` parametrisation lost orthogonality on tall matrices in our tests, hence the Cayley map.)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        upper = self.raw.triu(1)
        skew = upper - upper.T
        eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
        return torch.linalg.solve(eye + skew, eye - skew) @ base


@dataclass
class MatryoshkaKV(Recipe):
    name = "matryoshka"
    paper = "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection (Lin et al., arXiv 2410.14731)"
    saves = "K/V cache width: keys and values are cached in per-head orthogonal bases truncated to searched ranks"
    calibration = CalibrationRequest(num_samples=32, seq_len=128)
    distill_alpha = 0.25  # the paper's weight of the KL term

    budget: float = field(default=0.5, metadata={"help": "fraction of the KV-cache bytes to keep", "above": 0, "max": 1})
    uniform: bool = field(default=False, metadata={"help": "same rank for every head instead of the searched ranks", "flag": True})
    search_samples: int = field(default=4, metadata={"help": "calibration samples scored by the rank search", "min": 1})
    search_len: int = field(default=64, metadata={"help": "tokens of each sample scored by the rank search", "min": 2})
    batch_size: int = field(default=8, metadata={"help": "calibration batch size", "min": 1})

    def __post_init__(self):
        super().__post_init__()
        self.tensors: dict[str, torch.Tensor] = {}

    def validate(self, config: SurgeryConfig) -> None:
        if not 0 < self.budget <= 1:
            raise SurgeryError(f"--budget must be in (0, 1], got {self.budget}")
        if self.budget * STEPS_PER_HEAD < 1 - 1e-9:
            raise SurgeryError(f"--budget {self.budget} is below the smallest rank", hint="use at least 0.125")
        if config.head_dim % STEPS_PER_HEAD:
            raise SurgeryError(f"head_dim {config.head_dim} is not a multiple of {STEPS_PER_HEAD}")
        if self.uniform and abs(self.budget * STEPS_PER_HEAD - round(self.budget * STEPS_PER_HEAD)) > 1e-9:
            raise SurgeryError(f"--uniform needs a budget in steps of 1/{STEPS_PER_HEAD}, got {self.budget}",
                               hint="e.g. 0.25, 0.375, 0.5 or 0.75")
        if config.kv_key_ranks is not None and any(r is not None for r in config.kv_key_ranks):
            raise SurgeryError("the model already projects its K/V", hint="convert the original model instead")

    def plan(self, model, calibration_ids: torch.Tensor, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        config = model.config
        owners = config.owner_layers
        search_ids = calibration_ids[: self.search_samples, : self.search_len]
        reference = log_probs(model, search_ids)
        self.install_pca(model, calibration_ids, owners)
        full = config.head_dim
        if self.uniform:
            rank = round(self.budget * full)
            ranks = {(layer, h, kind): rank for layer in owners for h in range(config.num_key_value_heads)
                     for kind in ("key", "value")}
            search = {"method": "uniform"}
        else:
            snapshots = self.search(model, search_ids, reference, owners, [self.budget], progress)
            ranks = snapshots[self.budget]
            search = {"method": "greedy KL (lazy)", "samples": int(search_ids.shape[0])}
        self.set_ranks(model, ranks, owners)
        kl = kl_from(reference, log_probs(model, search_ids))
        self.tensors = self.truncated_tensors(model, owners)
        key_ranks, value_ranks = self.rank_lists(config, owners, lambda *key: ranks[key])
        kept = sum(sum(r) for r in key_ranks + value_ranks if r) / (2 * len(owners) * config.num_key_value_heads * full)
        return {"key_ranks": key_ranks, "value_ranks": value_ranks, "kv_fraction": round(kept, 6),
                "kl_on_calibration": round(kl, 6), "search": search}

    @torch.no_grad()
    def install_pca(self, model, ids: torch.Tensor, owners: list[int]) -> None:
        """Full-rank projections on every owner layer, initialised from PCA of the calibration K/V."""
        config = model.config
        stats = kv_covariances(model, ids, owners, self.batch_size)
        set_kv_ranks(model, *self.rank_lists(config, owners, lambda *_: config.head_dim))
        for layer in owners:
            projection = model.model.layers[layer].self_attn.kv_projection
            for kind, bases, mean in (("key", projection.key_bases, projection.key_mean),
                                      ("value", projection.value_bases, projection.value_mean)):
                means, vectors = principal_bases(*stats[layer, kind])
                mean.copy_(means.to(mean.dtype))
                for basis, vector in zip(bases, vectors):
                    basis.weight.copy_(vector.to(basis.weight.dtype))

    @staticmethod
    def rank_lists(config, owners: list[int], rank_of) -> tuple[list, list]:
        """Config-shaped (key_ranks, value_ranks): a list per layer, None for layers that read another's cache."""
        heads = range(config.num_key_value_heads)
        return tuple(
            [[rank_of(layer, h, kind) for h in heads] if layer in owners else None for layer in range(config.num_hidden_layers)]
            for kind in ("key", "value")
        )

    def set_ranks(self, model, ranks: dict, owners: list[int]) -> None:
        set_kv_ranks(model, *self.rank_lists(model.config, owners, lambda *key: ranks[key]))

    def search(self, model, ids, reference, owners, budgets: list[float], progress: bool) -> dict[float, dict]:
        """Greedy rank lowering down to the smallest budget; a snapshot of the ranks at each budget.

        Each step lowers the (layer, head, K/V) whose next step down costs the least KL. A step's cost is measured
        with every other head at full rank (a separable estimate): one forward pass per candidate and rank, all
        up front, instead of re-scoring every candidate after every step.
        """
        config = model.config
        step = config.head_dim // STEPS_PER_HEAD
        full = {(layer, h, kind): config.head_dim for layer in owners for h in range(config.num_key_value_heads)
                for kind in ("key", "value")}
        costs: dict[tuple, list[float]] = {}
        trials = [(c, r) for c in sorted(full) for r in range(config.head_dim - step, 0, -step)]
        kl_at: dict[tuple, float] = {}
        for candidate, rank in tqdm(trials, desc="rank search: scoring", disable=not progress, leave=False):
            self.set_ranks(model, {**full, candidate: rank}, owners)
            kl_at[candidate, rank] = kl_from(reference, log_probs(model, ids))
        for candidate in full:
            curve = [0.0] + [kl_at[candidate, r] for r in range(config.head_dim - step, 0, -step)]
            costs[candidate] = [after - before for before, after in zip(curve, curve[1:])]

        ranks = dict(full)
        total_steps = len(ranks) * STEPS_PER_HEAD
        targets = {budget: math.floor(budget * total_steps + 1e-9) for budget in budgets}
        remaining = total_steps
        heap = [(costs[c][0], c) for c in ranks]
        heapq.heapify(heap)
        snapshots = {b: dict(ranks) for b, t in targets.items() if t >= remaining}
        while heap and remaining > min(targets.values()):
            _, candidate = heapq.heappop(heap)
            ranks[candidate] -= step
            remaining -= 1
            taken = (config.head_dim - ranks[candidate]) // step
            if ranks[candidate] > step:
                heapq.heappush(heap, (costs[candidate][taken], candidate))
            for budget, target in targets.items():
                if remaining == target:
                    snapshots[budget] = dict(ranks)
        return snapshots

    @staticmethod
    def truncated_tensors(model, owners: list[int]) -> dict[str, torch.Tensor]:
        """Bases cut to their ranks, and the means: the only new tensors the checkpoint stores."""
        tensors = {}
        for layer in owners:
            projection = model.model.layers[layer].self_attn.kv_projection
            prefix = f"model.layers.{layer}.self_attn.kv_projection"
            for kind, bases in (("key_bases", projection.key_bases), ("value_bases", projection.value_bases)):
                for h, basis in enumerate(bases):
                    tensors[f"{prefix}.{kind}.{h}.weight"] = basis().detach().clone().contiguous()
            tensors[f"{prefix}.key_mean"] = projection.key_mean.detach().clone()
            tensors[f"{prefix}.value_mean"] = projection.value_mean.detach().clone()
        return tensors

    def new_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        config.kv_key_ranks = [None if r is None else list(r) for r in plan["key_ranks"]]
        config.kv_value_ranks = [None if r is None else list(r) for r in plan["value_ranks"]]
        config.validate_architecture()

    def describe(self, plan: dict[str, Any]) -> list[str]:
        lines = [f"KV cache kept: {plan.get('kv_fraction', 0):.1%} of the bytes "
                 f"(KL on calibration {plan.get('kl_on_calibration', 0):.4f})"]
        for layer, (keys, values) in enumerate(zip(plan.get("key_ranks", []), plan.get("value_ranks", []))):
            if keys is not None:
                lines.append(f"layer {layer}: key ranks {keys}, value ranks {values}")
        return lines

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        """U (through its Cayley rotation) and μ; the stored basis W₀ itself stays fixed."""
        return ".kv_projection." in name and not name.endswith(".original")

    @staticmethod
    def _bases(model) -> list:
        return [basis for layer in model.model.layers
                if getattr(layer.self_attn, "kv_projection", None) is not None
                for basis in (*layer.self_attn.kv_projection.key_bases, *layer.self_attn.kv_projection.value_bases)]

    def prepare_training(self, model) -> None:
        for basis in self._bases(model):
            basis.stored_rank = basis.rank
            parametrize.register_parametrization(basis, "weight", CayleyRotation(basis.weight.shape[0]).to(basis.weight))

    def before_step(self, model, generator: torch.Generator) -> None:
        """Matryoshka training: each (layer, head, K/V) draws its rank from {d/8, 2d/8, ...} up to the stored rank."""
        for basis in self._bases(model):
            step = basis.weight.shape[0] // STEPS_PER_HEAD
            choices = basis.stored_rank // step
            basis.rank = step * (1 + int(torch.randint(choices, (1,), generator=generator)))

    def finish_training(self, model) -> None:
        for basis in self._bases(model):
            parametrize.remove_parametrizations(basis, "weight", leave_parametrized=True)
            basis.rank = basis.stored_rank
