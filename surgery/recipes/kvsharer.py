"""KVSharer (Yang et al., arXiv 2410.18517): later layers reuse the KV cache of the most *dissimilar* earlier layers.

Algorithm, as in the paper:
1. Run the model with the cache on over calibration samples; per layer, average the post-RoPE K and the V over them.
2. For each pair i > j, D(i, j) = ½ (mean over heads and positions of ‖K̄_i − K̄_j‖₂ over head_dim, + the same for V).
3. Visit pairs by D, most dissimilar first. Skip i if it already shares. Otherwise let layer i read the cache of j's
   root, and keep the change only if the mean cosine similarity of the final-norm hidden states with the original
   model's stays above the threshold. Stop at the target number of sharing layers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from tqdm.auto import tqdm

from surgery.base.errors import SurgeryError
from surgery.base.lazy import lazy_import
from surgery.recipes.base import CalibrationRequest, Recipe

torch = lazy_import("torch")
if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig
    from surgery.calibrate.layer_runner import LayerRunner, RunState

ORDERS = ("dissimilar", "similar", "random")


def mean_post_rope_kv(state: RunState, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the post-RoPE keys and the values averaged over samples: (kv_heads, seq, head_dim), float64."""
    layers = sorted(state.kv)
    keys = [sum(k.double().sum(0) for k, _ in state.kv[layer]) / count for layer in layers]
    values = [sum(v.double().sum(0) for _, v in state.kv[layer]) / count for layer in layers]
    return keys, values


def pair_distances(keys: list[torch.Tensor], values: list[torch.Tensor]) -> dict[tuple[int, int], float]:
    """D(i, j) for every i > j: half the sum of the mean per-(head, position) L2 distances of K̄ and of V̄."""
    def mean_l2(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.linalg.vector_norm(a - b, dim=-1).mean().item()

    return {
        (i, j): 0.5 * (mean_l2(keys[i], keys[j]) + mean_l2(values[i], values[j]))
        for i in range(len(keys))
        for j in range(i)
    }


def mean_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    sims = [torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).flatten() for x, y in zip(a, b)]
    return torch.cat(sims).mean().item()


def share(kv_source: list[int], layer: int, onto: int) -> list[int]:
    """Let `layer` read `onto`'s root cache; layers that read `layer` follow it, so no chain is left behind."""
    root = kv_source[onto]
    return [root if source == layer else source for source in kv_source]


@dataclass
class KVSharer(Recipe):
    name = "kvsharer"
    paper = "KVSharer: Efficient Inference via Layer-Wise Dissimilar KV Cache Sharing (Yang et al., arXiv 2410.18517)"
    saves = "the KV cache and the k_proj/v_proj weights of every sharing layer"
    calibration = CalibrationRequest(num_samples=30, seq_len=64)
    milder = "fewer --share-layers, --order similar, or `surgery adapt` afterwards"
    renamed_options: ClassVar[dict[str, str | None]] = {"batch_size": None}
    distill_alpha = 1.0  # the paper does not train; pure distillation targets the gap to the base model

    share_layers: int | None = field(default=None, metadata={"help": "number of layers that share (default: 25% of layers)", "min": 1})
    ratio: float | None = field(default=None, metadata={"help": "fraction of layers that share, instead of --share-layers", "above": 0, "below": 1})
    threshold: float = field(default=0.5, metadata={"help": "min. mean cosine similarity of final hidden states", "min": -1, "max": 1})
    order: str = field(default="dissimilar", metadata={"help": "pair order: dissimilar (paper), similar or random", "choices": ORDERS})

    def target(self, num_layers: int) -> int:
        if self.share_layers is not None:
            return self.share_layers
        return round((0.25 if self.ratio is None else self.ratio) * num_layers)

    def validate(self, config: SurgeryConfig) -> None:
        layers = config.num_hidden_layers
        if self.share_layers is not None and self.ratio is not None:
            raise SurgeryError("--share-layers and --ratio both given", hint="pass only one of them")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise SurgeryError(f"--ratio must be between 0 and 1, got {self.ratio}")
        if self.share_layers is not None and not 0 <= self.share_layers < layers:
            raise SurgeryError(
                f"--share-layers {self.share_layers} is out of range for a model with {layers} layers",
                hint=f"pass a number from 1 to {layers - 1}: layer 0 always keeps its cache",
            )
        if self.order not in ORDERS:
            raise SurgeryError(f"unknown --order {self.order!r}", hint=f"choose from {', '.join(ORDERS)}")
        if config.sharing_layers:
            raise SurgeryError("the model already shares KV caches", hint="convert the original model instead")

    def ordered_pairs(self, distances: dict[tuple[int, int], float], seed: int) -> list[tuple[int, int]]:
        pairs = sorted(distances, key=lambda pair: (-distances[pair], pair))
        if self.order == "similar":
            pairs.reverse()
        elif self.order == "random":
            random.Random(seed).shuffle(pairs)
        return pairs

    def plan(self, runner: LayerRunner, calibration_ids: torch.Tensor, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
        """The paper's search, layer by layer: a trial that shares layer i re-runs only layers i.. (`runner`)."""
        num_layers = runner.config.num_hidden_layers
        target = self.target(num_layers)
        identity = list(range(num_layers))
        reference = runner.run(identity)
        keys, values = mean_post_rope_kv(reference, calibration_ids.shape[0])
        kinds = runner.config.layer_types  # a layer shares only with a layer of its kind: the same window and RoPE
        distances = {pair: d for pair, d in pair_distances(keys, values).items() if kinds[pair[0]] == kinds[pair[1]]}
        reference_final = reference.final  # the rest of the reference run stays only as the runner's state
        del reference, keys, values

        kv_source, accepted, tried = identity, [], 0
        pairs = self.ordered_pairs(distances, seed)
        bar = tqdm(total=target, desc="kvsharer search", unit="layer", disable=not progress)
        try:
            for layer, onto in pairs:
                if len(accepted) >= target:
                    break
                if kv_source[layer] != layer:
                    continue
                candidate = share(kv_source, layer, onto)
                trial = runner.run(candidate, start=layer, commit=False)  # layers before `layer` are unchanged
                similarity = mean_cosine(trial.final, reference_final)
                tried += 1
                if similarity > self.threshold:
                    runner.commit(trial, candidate)
                    kv_source = candidate
                    accepted.append({"layer": layer, "onto": onto, "distance": round(distances[layer, onto], 6),
                                     "similarity": round(similarity, 6)})
                    bar.update(1)
                bar.set_postfix(tried=tried, similarity=f"{similarity:.3f}")
        finally:
            bar.close()
        if len(accepted) < target:
            raise SurgeryError(
                f"kvsharer found only {len(accepted)} of {target} sharing layers above threshold {self.threshold}",
                hint="lower --threshold or ask for fewer --share-layers",
            )
        return {"kv_source": kv_source, "shared": accepted, "candidates_tried": tried}

    def describe(self, plan: dict[str, Any]) -> list[str]:
        kv_source = plan.get("kv_source", [])
        sharing = [(layer, source) for layer, source in enumerate(kv_source) if source != layer]
        lines = [f"{len(sharing)} of {len(kv_source)} layers reuse an earlier layer's KV cache"]
        lines += [f"layer {layer} reads the KV cache of layer {source}" for layer, source in sharing]
        return lines

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        """Beyond the paper (which does not train): the sharing layers' q_proj and o_proj, to fit the borrowed K/V."""
        return any(name.startswith(f"model.layers.{layer}.self_attn.{part}.")
                   for layer in config.sharing_layers for part in ("q_proj", "o_proj"))

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        config.kv_source = list(plan["kv_source"])
        config.validate_architecture()
