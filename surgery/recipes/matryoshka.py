"""MatryoshkaKV (Lin et al., arXiv 2410.14731): orthogonal per-KV-head projections that shrink the K/V cache.

Conversion, one decoder layer at a time (`LayerRunner`):
1. PCA init: per layer and KV head, centre the post-RoPE keys (and the values) of the calibration set, take the
   covariance, `eigh` it and sort the eigenvectors by descending eigenvalue: U_K, U_V and the means μ_K, μ_V.
2. Ranks for a KV budget: start at full rank and greedily lower one (layer, head, K/V) rank by head_dim/8 at a
   time, the one whose output distribution moves least (KL against the unprojected model on calibration data,
   the paper's Algorithm 1), until the cache is at the budget. `--uniform` gives every head the same rank.
3. The checkpoint stores each basis truncated to its rank; `surgery adapt` then trains U (kept orthogonal) and μ
   with ranks sampled per step (Matryoshka training), the base model frozen.

Deviations, for speed (the paper re-scores every candidate after every step: about 180 × 700 forward passes for
SmolLM2 at a 50% budget, days on a CPU):
- Separable costs: a candidate's KL at a rank is measured with every other head at full rank, and the greedy
  walk takes the cheapest next step from those curves. The first step is exactly the paper's.
- Coarse then fine (`--search fast`, the default): each candidate is measured once, at half rank; its KL curve
  between measurements follows the PCA spectrum (KL(r) ≈ c · the variance fraction beyond r, c fitted to the
  measurements). The walk then runs on those curves, and each candidate is measured again at the rank the walk
  gave it and one step below, which fixes the costs where the budget's boundary lies; the walk runs again, and
  again measures what is new around the boundary, until nothing is (at most 3 rounds). That is about 3 trials
  per candidate instead of 7; `--search exhaustive` measures every rank.
- A trial that changes layer i re-runs only layers i.. from the hidden states kept at its input.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tqdm.auto import tqdm

from surgery.base.errors import SurgeryError
from surgery.base.lazy import lazy_import
from surgery.recipes.base import CalibrationRequest, Recipe
matryoshka_surgery = lazy_import("surgery.arch.matryoshka_surgery")
orthogonal = lazy_import("surgery.train.orthogonal")

torch = lazy_import("torch")
if TYPE_CHECKING:
    from torch import nn

    from surgery.arch.configuration_surgery import SurgeryConfig
    from surgery.arch.matryoshka_surgery import KVProjection
    from surgery.calibrate.layer_runner import KV, LayerRunner

STEPS_PER_HEAD = 8  # ranks move in steps of head_dim / 8, as in the paper
FINE_ROUNDS = 3  # fast search: re-measure around each budget's boundary until it stops moving, at most this often
SEARCHES = ("fast", "exhaustive")
KINDS = ("key", "value")
Candidate = tuple[int, int, str]  # (layer, KV head, "key" or "value")


class KVStatistics:
    """Per owner layer and K/V: sums, outer-product sums and counts of post-RoPE keys and of values, per KV head,
    in float64, accumulated batch by batch (the runner's `visit`)."""

    def __init__(self):
        self.sums: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, int]] = {}

    def add(self, layer: int, kv: list[KV]) -> None:
        for keys, values in kv:
            for kind, tensor in zip(KINDS, (keys, values)):
                x = tensor.double().transpose(0, 1).flatten(1, 2)  # (kv_heads, tokens, head_dim)
                total, outer, count = self.sums.get((layer, kind), (0, 0, 0))
                self.sums[layer, kind] = (total + x.sum(1), outer + x.transpose(1, 2) @ x, count + x.shape[1])

    def __getitem__(self, key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.sums[key]


def principal_bases(total: torch.Tensor, outer: torch.Tensor, count: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means (heads, d), eigenvector bases (heads, d, d) with columns by descending eigenvalue of the covariance,
    and those eigenvalues (heads, d)."""
    mean = total / count
    covariance = outer / count - mean[:, :, None] * mean[:, None, :]
    values, vectors = torch.linalg.eigh(covariance)
    return mean, vectors.flip(-1), values.flip(-1).clamp_min(0)


def kl_from(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(reference ‖ candidate), both given as log-probabilities, batch by batch."""
    total = sum((r.exp() * (r - c)).sum(-1).sum().item() for r, c in zip(reference, candidate))
    return total / sum(r.shape[:-1].numel() for r in reference)


@dataclass
class KLCurves:
    """Each candidate's KL when it alone is lowered to a rank: measured where a trial ran, elsewhere the PCA
    spectrum's tail (variance fraction beyond the rank) scaled to fit the nearest measurements."""

    head_dim: int
    spectra: dict[Candidate, torch.Tensor]  # descending eigenvalues
    measured: dict[Candidate, dict[int, float]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return self.head_dim // STEPS_PER_HEAD

    def ranks(self) -> list[int]:
        """The ranks below full, largest first."""
        return list(range(self.head_dim - self.step, 0, -self.step))

    def tail(self, candidate: Candidate, rank: int) -> float:
        spectrum = self.spectra[candidate]
        return spectrum[rank:].sum().item() / max(spectrum.sum().item(), 1e-30)

    def estimate(self, candidate: Candidate, rank: int) -> float:
        if rank >= self.head_dim:
            return 0.0
        points = self.measured.get(candidate, {})
        if rank in points:
            return points[rank]
        if not points:
            raise ValueError(f"no measurement for {candidate}")
        scales = sorted((r, kl / max(self.tail(candidate, r), 1e-12)) for r, kl in points.items())
        below = [(r, c) for r, c in scales if r < rank]
        above = [(r, c) for r, c in scales if r > rank]
        if below and above:
            (r0, c0), (r1, c1) = below[-1], above[0]
            scale = c0 + (c1 - c0) * (rank - r0) / (r1 - r0)
        else:
            scale = (below[-1] if below else above[0])[1]
        return scale * self.tail(candidate, rank)

    def step_costs(self, candidate: Candidate) -> list[float]:
        """KL added by each step down from full rank."""
        curve = [0.0] + [self.estimate(candidate, rank) for rank in self.ranks()]
        return [after - before for before, after in zip(curve, curve[1:])]


def greedy_ranks(curves: KLCurves, budgets: list[float]) -> dict[float, dict[Candidate, int]]:
    """Greedy rank lowering down to the smallest budget, cheapest next step first; the ranks at each budget."""
    step, full = curves.step, curves.head_dim
    costs = {candidate: curves.step_costs(candidate) for candidate in curves.spectra}
    ranks = {candidate: full for candidate in curves.spectra}
    total_steps = len(ranks) * STEPS_PER_HEAD
    targets = {budget: math.floor(budget * total_steps + 1e-9) for budget in budgets}
    remaining = total_steps
    heap = [(costs[c][0], c) for c in sorted(ranks)]
    heapq.heapify(heap)
    snapshots = {b: dict(ranks) for b, t in targets.items() if t >= remaining}
    while heap and remaining > min(targets.values()):
        _, candidate = heapq.heappop(heap)
        ranks[candidate] -= step
        remaining -= 1
        taken = (full - ranks[candidate]) // step
        if ranks[candidate] > step:
            heapq.heappush(heap, (costs[candidate][taken], candidate))
        for budget, target in targets.items():
            if remaining == target:
                snapshots[budget] = dict(ranks)
    return snapshots


def search_ranks(score: Callable[[Candidate, int], float], curves: KLCurves, budgets: list[float],
                 method: str = "fast", progress: bool = False) -> dict[float, dict[Candidate, int]]:
    """The rank search (see the module docstring): `score(candidate, rank)` runs one trial and returns its KL."""

    def measure(trials: list[tuple[Candidate, int]], stage: str) -> None:
        for candidate, rank in tqdm(trials, desc=f"rank search: {stage}", unit="trial", disable=not progress):
            curves.measured.setdefault(candidate, {})[rank] = score(candidate, rank)

    candidates = sorted(curves.spectra)
    if method == "exhaustive":
        measure([(c, r) for c in candidates for r in curves.ranks()], "every rank")
        return greedy_ranks(curves, budgets)
    half = curves.head_dim // 2
    measure([(c, half) for c in candidates], "coarse")
    walked = greedy_ranks(curves, budgets)
    for round_ in range(1, FINE_ROUNDS + 1):
        wanted = {(c, r) for ranks in walked.values() for c, rank in ranks.items()
                  for r in (rank, rank - curves.step) if 0 < r < curves.head_dim}
        fresh = sorted(trial for trial in wanted if trial[1] not in curves.measured[trial[0]])
        if not fresh:
            break
        measure(fresh, f"fine {round_}")
        walked = greedy_ranks(curves, budgets)
    return walked


def bases_of(projection: KVProjection, kind: str) -> nn.ModuleList:
    return projection.key_bases if kind == "key" else projection.value_bases


def set_ranks(projections: dict[int, KVProjection], ranks: dict[Candidate, int]) -> None:
    for (layer, head, kind), rank in ranks.items():
        bases_of(projections[layer], kind)[head].rank = rank


def rank_lists(config, owners: list[int], ranks: dict[Candidate, int]) -> tuple[list, list]:
    """Config-shaped (key_ranks, value_ranks): a list per layer, None for layers that read another's cache."""
    heads = range(config.num_key_value_heads)
    return tuple(
        [[ranks[layer, h, kind] for h in heads] if layer in owners else None for layer in range(config.num_hidden_layers)]
        for kind in KINDS
    )


def truncated_tensors(projections: dict[int, KVProjection]) -> dict[str, torch.Tensor]:
    """Bases cut to their ranks, and the means: the only new tensors the checkpoint stores."""
    tensors = {}
    for layer, projection in projections.items():
        prefix = f"model.layers.{layer}.self_attn.kv_projection"
        for kind in KINDS:
            for h, basis in enumerate(bases_of(projection, kind)):
                tensors[f"{prefix}.{kind}_bases.{h}.weight"] = basis().detach().clone().contiguous()
        tensors[f"{prefix}.key_mean"] = projection.key_mean.detach().clone()
        tensors[f"{prefix}.value_mean"] = projection.value_mean.detach().clone()
    return tensors


@dataclass
class MatryoshkaKV(Recipe):
    name = "matryoshka"
    paper = "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection (Lin et al., arXiv 2410.14731)"
    saves = "K/V cache width: keys and values are cached in per-head orthogonal bases truncated to searched ranks"
    calibration = CalibrationRequest(num_samples=32, seq_len=128)
    distill_alpha = 0.25  # the paper's weight of the KL term

    milder = "a larger --kv-fraction, or `surgery adapt` afterwards"
    renamed_options: ClassVar[dict[str, str | None]] = {"budget": "kv_fraction", "batch_size": None}

    kv_fraction: float = field(default=0.5, metadata={"help": "fraction of the K/V width (cache bytes) kept, over all heads", "above": 0, "max": 1})
    uniform: bool = field(default=False, metadata={"help": "same rank for every head instead of the searched ranks", "flag": True})
    search: str = field(default="fast", metadata={"help": "rank search: fast (coarse then fine) or exhaustive (every rank)", "choices": SEARCHES})
    search_samples: int = field(default=4, metadata={"help": "calibration samples scored by the rank search", "min": 1})
    search_len: int = field(default=32, metadata={"help": "tokens of each sample scored by the rank search", "min": 2})

    def __post_init__(self):
        super().__post_init__()
        self.tensors: dict[str, torch.Tensor] = {}

    def validate(self, config: SurgeryConfig) -> None:
        if self.kv_fraction * STEPS_PER_HEAD < 1 - 1e-9:
            raise SurgeryError(f"--kv-fraction {self.kv_fraction} is below the smallest rank", hint="use at least 0.125")
        if config.head_dim % STEPS_PER_HEAD:
            raise SurgeryError(f"head_dim {config.head_dim} is not a multiple of {STEPS_PER_HEAD}")
        if self.uniform and abs(self.kv_fraction * STEPS_PER_HEAD - round(self.kv_fraction * STEPS_PER_HEAD)) > 1e-9:
            raise SurgeryError(f"--uniform needs a --kv-fraction in steps of 1/{STEPS_PER_HEAD}, got {self.kv_fraction}",
                               hint="e.g. 0.25, 0.375, 0.5 or 0.75")
        if self.search not in SEARCHES:
            raise SurgeryError(f"unknown --search {self.search!r}", hint=f"choose from {', '.join(SEARCHES)}")
        if config.matryoshka_key_ranks is not None and any(r is not None for r in config.matryoshka_key_ranks):
            raise SurgeryError("the model already projects its K/V", hint="convert the original model instead")

    def plan(self, runner: LayerRunner, calibration_ids: torch.Tensor, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
        config = runner.config
        owners = config.owner_layers
        projections, spectra = self.install_pca(runner, owners, progress)
        searcher = runner.on(calibration_ids[: self.search_samples, : self.search_len])
        reference = searcher.log_probs(searcher.run(runner.kv_source).final)
        if self.uniform:
            rank = round(self.kv_fraction * config.head_dim)
            ranks = {candidate: rank for candidate in spectra}
            search = {"method": "uniform"}
        else:
            curves = KLCurves(config.head_dim, spectra)
            score = self.trial_scorer(searcher, projections, reference)
            ranks = self.search_ranks(score, curves, progress)
            search = {"method": f"greedy KL, {self.search}", "samples": int(searcher.ids.shape[0]),
                      "tokens": int(searcher.ids.shape[1]), "trials": sum(map(len, curves.measured.values()))}
        set_ranks(projections, ranks)
        planned = searcher.run(runner.kv_source, projections=projections, commit=False, record=False)
        kl = kl_from(reference, searcher.log_probs(planned.final))
        self.tensors = truncated_tensors(projections)
        key_ranks, value_ranks = rank_lists(config, owners, ranks)
        kept = sum(ranks.values()) / (len(ranks) * config.head_dim)
        return {"key_ranks": key_ranks, "value_ranks": value_ranks, "kv_fraction": round(kept, 6),
                "kl_on_calibration": round(kl, 6), "search": search}

    def search_ranks(self, score: Callable[[Candidate, int], float], curves: KLCurves,
                     progress: bool) -> dict[Candidate, int]:
        """The searched ranks at this recipe's budget (a method, so a benchmark can replay a search it ran)."""
        return search_ranks(score, curves, [self.kv_fraction], self.search, progress)[self.kv_fraction]

    def install_pca(self, runner: LayerRunner, owners: list[int], progress: bool
                    ) -> tuple[dict[int, KVProjection], dict[Candidate, torch.Tensor]]:
        """Full-rank projections of every owner layer from PCA of the calibration K/V, and each basis' spectrum."""

        config = runner.config
        statistics = KVStatistics()
        runner.run(runner.kv_source, commit=False, record=False, visit=statistics.add)
        projections, spectra = {}, {}
        full = [config.head_dim] * config.num_key_value_heads
        with torch.no_grad():  # the bases are filled in place
            for layer in tqdm(owners, desc="PCA", unit="layer", disable=not progress, leave=False):
                projection = matryoshka_surgery.KVProjection(config.head_dim, full, full).to(runner.device, runner.dtype)
                for kind in KINDS:
                    mean = projection.key_mean if kind == "key" else projection.value_mean
                    total, outer, count = statistics[layer, kind]
                    means, vectors, eigenvalues = principal_bases(total.cpu(), outer.cpu(), count)
                    mean.copy_(means.to(mean))
                    for h, (basis, vector) in enumerate(zip(bases_of(projection, kind), vectors)):
                        basis.weight.copy_(vector.to(basis.weight))
                        spectra[layer, h, kind] = eigenvalues[h]
                projections[layer] = projection.requires_grad_(False)
        return projections, spectra

    @staticmethod
    def trial_scorer(searcher: LayerRunner, projections: dict[int, KVProjection], reference: list[torch.Tensor]
                     ) -> Callable[[Candidate, int], float]:
        """KL of the model with one candidate lowered to a rank, every other head unprojected: the trial re-runs
        only from the candidate's layer."""

        def score(candidate: Candidate, rank: int) -> float:
            layer, head, kind = candidate
            basis = bases_of(projections[layer], kind)[head]
            full, basis.rank = basis.rank, rank
            try:
                trial = searcher.run(searcher.kv_source, start=layer, commit=False, record=False,
                                     projections={layer: projections[layer]})
            finally:
                basis.rank = full
            return kl_from(reference, searcher.log_probs(trial.final))

        return score

    def new_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        config.matryoshka_key_ranks = [None if r is None else list(r) for r in plan["key_ranks"]]
        config.matryoshka_value_ranks = [None if r is None else list(r) for r in plan["value_ranks"]]
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
        from torch.nn.utils import parametrize


        for basis in self._bases(model):
            basis.stored_rank = basis.rank
            parametrize.register_parametrization(basis, "weight", orthogonal.CayleyRotation(basis.weight.shape[0]).to(basis.weight))

    def before_step(self, model, generator: torch.Generator) -> None:
        """Matryoshka training: each (layer, head, K/V) draws its rank from {d/8, 2d/8, ...} up to the stored rank."""
        for basis in self._bases(model):
            step = basis.weight.shape[0] // STEPS_PER_HEAD
            choices = basis.stored_rank // step
            basis.rank = step * (1 + int(torch.randint(choices, (1,), generator=generator)))

    def finish_training(self, model) -> None:
        from torch.nn.utils import parametrize

        for basis in self._bases(model):
            parametrize.remove_parametrizations(basis, "weight", leave_parametrized=True)
            basis.rank = basis.stored_rank
