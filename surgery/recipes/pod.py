"""PoD (Ma et al., arXiv 2412.02252): proximal tokens over distant tokens. Layers whose attention is alike share
the keys of distant tokens; proximal tokens (the first `sinks`, the last `recent`) keep every layer's own keys.

Grouping, as the paper does it offline (the choices it leaves open are marked):
1. Run calibration samples of at least 1k tokens through the source, one layer at a time.
2. For every layer, take the attention distributions of the last `last_queries` (64) queries of each sample,
   and average them over the query heads of each KV head.
3. Similarity of layer l to layer b, per KV head: 1 − JSD(P_l ‖ P_b), the Jensen–Shannon divergence in bits
   (so it lies in [0, 1]), averaged over those queries and the samples. (Choice: the paper names a JS-based
   similarity; 1 − JSD in bits is the plain one.) P is, by default, the attention over the *distant* keys only
   (those that will be shared: after the first `sinks`, more than `recent` before the query), renormalised: the
   paper's motivating observation is that attention over distant tokens is alike across neighbouring layers, and
   only those keys are shared, so the proximal keys each layer keeps must not decide the groups. `--similarity
   whole` compares the whole attention rows instead, as this recipe did first.
4. Per KV head, bottom-up: layer 0 opens a group; each next layer joins the open group while its similarity to the
   group's bottom layer is at least δ (default 0.5), else it opens a new group. (Choice: compared with the bottom
   layer, whose keys the layer will use, not with its neighbour.)

Layers above a group's bottom keep their own keys only for proximal tokens; the cache saving is on keys only, at
most half the KV. Only keys are shared, although the paper speaks of sharing attention scores: each layer keeps
its own queries and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.errors import SurgeryError
from surgery.base.lazy import lazy_import
from surgery.recipes.base import CalibrationRequest, Recipe, every_layer_slides
modeling_surgery = lazy_import("surgery.arch.modeling_surgery")

torch = lazy_import("torch")

if TYPE_CHECKING:
    from surgery.arch.configuration_surgery import SurgeryConfig
    from surgery.calibrate.layer_runner import LayerRunner


def last_query_attention(layer, hidden: torch.Tensor, rotary, config, last: int) -> torch.Tensor:
    """(batch, kv_heads, last, n) float64: the softmax attention of the last `last` queries of each sample to
    every key, averaged over the query heads of each KV head (plain PyTorch, as the source computes it)."""

    attention = layer.self_attn
    x = layer.input_layernorm(hidden)
    n = hidden.shape[1]
    last = min(last, n)
    cos, sin = rotary(hidden, torch.arange(n, device=hidden.device)[None])[layer.layer_type]
    query = attention.project_query(x[:, n - last :], cos[:, n - last :], sin[:, n - last :]).double()
    key = attention.project_key(x, cos, sin).double()
    group = config.num_attention_heads // config.num_key_value_heads
    scores = query @ key.repeat_interleave(group, dim=1).transpose(2, 3) * attention.scaling
    scores = modeling_surgery.soft_cap(scores, attention.softcap)
    keys, queries = torch.arange(n, device=hidden.device)[None, :], torch.arange(n - last, n, device=hidden.device)[:, None]
    allowed = keys <= queries
    if attention.sliding_window is not None:  # a sliding layer reads only its window, as the source does
        allowed &= keys > queries - attention.sliding_window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    batch = probs.shape[0]
    return probs.view(batch, config.num_key_value_heads, group, last, n).mean(2)


def distant_attention(probs: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """The last queries' attention (…, last, n) restricted to the distant keys and renormalised: key j is distant
    for the query at position t when sinks <= j <= t − recent (the keys PoD shares). A row with no distant key
    stays all zero, and `js_similarity` leaves it out."""
    last, n = probs.shape[-2:]
    keys = torch.arange(n, device=probs.device)
    queries = torch.arange(n - last, n, device=probs.device)[:, None]
    distant = (keys >= sinks) & (keys <= queries - recent)
    part = probs * distant
    return part / part.sum(-1, keepdim=True).clamp_min(1e-300)


def js_similarity(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1 − JSD(p ‖ q) in bits, per KV head, averaged over every other leading dimension: (kv_heads,)."""
    mixture = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (torch.log2(a.clamp_min(1e-300)) - torch.log2(b.clamp_min(1e-300))), 0.0).sum(-1)

    divergence = 0.5 * (kl(p, mixture) + kl(q, mixture))
    rows = ((p.sum(-1) > 0) & (q.sum(-1) > 0)).to(divergence.dtype)  # rows that have a distribution on both sides
    counted = rows.transpose(0, 1).flatten(1).sum(-1)
    divergence = (divergence * rows).transpose(0, 1).flatten(1).sum(-1) / counted.clamp_min(1)
    # no row to compare (a sliding layer has no distant attention): not similar, so the layer is not grouped
    return torch.where(counted > 0, 1.0 - divergence, torch.zeros_like(divergence))


class GreedyGrouping:
    """Bottom-up grouping per KV head, fed one layer at a time. Only each head's open group's bottom attention is
    kept, so memory does not grow with depth."""

    def __init__(self, delta: float):
        self.delta = delta
        self.key_source: list[list[int]] = []
        self.similarity: list[list[float]] = []
        self.bottoms: list[tuple[int, torch.Tensor]] = []  # per KV head: (bottom layer, its attention for that head)

    def keep_own(self, layer: int, heads: int) -> None:
        """A layer outside every group (a sliding-window layer): its own keys, and the open groups stay open."""
        self.key_source.append([layer] * heads)
        self.similarity.append([1.0] * heads)

    def add(self, layer: int, attention: torch.Tensor) -> None:
        """attention: (samples, kv_heads, queries, keys) of the next layer."""
        heads = attention.shape[1]
        if not self.bottoms:
            self.bottoms = [(layer, attention[:, head]) for head in range(heads)]
            self.key_source.append([layer] * heads)
            self.similarity.append([1.0] * heads)
            return
        sources, scores = [], []
        for head, (bottom, bottom_attention) in enumerate(self.bottoms):
            score = float(js_similarity(attention[:, head : head + 1], bottom_attention[:, None])[0])
            if score < self.delta:
                self.bottoms[head] = (layer, attention[:, head])
            sources.append(self.bottoms[head][0])
            scores.append(round(score, 6))
        self.key_source.append(sources)
        self.similarity.append(scores)


@dataclass
class PoD(Recipe):
    name = "pod"
    paper = ("Compressing KV Cache for Long-Context LLM Inference with Inter-Layer Attention Similarity "
             "(PoD; Ma et al., arXiv 2412.02252)")
    saves = "the keys of distant tokens in every layer above the bottom of its group, per KV head"
    calibration = CalibrationRequest(num_samples=8, seq_len=1024)
    milder = "a higher --delta (fewer layers share), a longer --recent, or `surgery adapt` afterwards"
    distill_alpha = 1.0  # the paper post-trains with the LM loss on 5B tokens; here we distil into the source
    adapt_defaults: ClassVar[dict[str, Any]] = {"lr": 1e-2}  # few parameters: 10× adapt's lr (see is_trainable)
    excludes: ClassVar[dict[str, str]] = {
        "kvsharer": "PoD shares keys of distant tokens, KVSharer whole caches; a layer cannot do both",
        "matryoshka": "PoD's borrowed keys are full width; projected caches would not line up across layers",
        "dynamickv": "DynamicKV evicts while the prefill runs, before the layers of a group have read the shared keys",
    }

    sinks: int = field(default=16, metadata={"help": "first tokens every layer keeps its own keys for (the paper's 16)", "min": 0})
    recent: int = field(default=256, metadata={"help": "last tokens every layer keeps its own keys for (the paper: 4,080 at 32K)", "min": 1})
    delta: float = field(default=0.5, metadata={"help": "min. similarity (1 − JSD) to a group's bottom layer to join it; above 1: no sharing", "min": 0})
    last_queries: int = field(default=64, metadata={"help": "queries per calibration sample whose attention is compared", "min": 1})
    similarity: str = field(default="distant", metadata={"help": "which attention groups the layers: over the distant keys only, the ones shared (distant), or whole rows (whole)", "choices": ["distant", "whole"]})
    skip_threshold: float | None = field(default=None, metadata={"help": "skip the distant tokens for query rows whose proximal attention mass is at least this (the paper's 0.7; default: never)", "above": 0, "max": 1})

    def validate(self, config: SurgeryConfig) -> None:
        if config.pod_key_source is not None:
            raise SurgeryError("the model already shares keys with PoD", hint="convert the original model instead")
        if len(config.full_attention_owners) < 2:
            if not config.full_attention_owners:
                raise every_layer_slides(config, "no layer has distant tokens to share")
            raise SurgeryError("PoD shares distant keys between full-attention layers, and this model has one",
                               hint="convert a model with several full-attention layers")

    def plan(self, runner: LayerRunner, calibration_ids: torch.Tensor, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
        """One pass through the layers, grouping as it goes."""
        config = runner.config
        if calibration_ids.shape[1] < 1024:
            raise SurgeryError(f"PoD groups layers from calibration samples of at least 1,024 tokens, got "
                               f"{calibration_ids.shape[1]}", hint="pass --seq-len 1024 or more")
        grouping = GreedyGrouping(self.delta)

        def signal(attention: torch.Tensor) -> torch.Tensor:
            return distant_attention(attention, self.sinks, self.recent) if self.similarity == "distant" else attention

        def inspect(index, layer, hidden):
            if config.is_sliding(index):  # no distant tokens: keeps its own keys, and is no group's bottom
                grouping.keep_own(index, config.num_key_value_heads)
                return
            grouping.add(index, torch.cat([signal(last_query_attention(layer, h, runner.rotary, config,
                                                                       self.last_queries)) for h in hidden]))

        runner.run(list(range(config.num_hidden_layers)), record=False, inspect=inspect)
        return {"key_source": grouping.key_source, "similarity": grouping.similarity, "sinks": self.sinks,
                "recent": self.recent, "delta": self.delta, "skip_threshold": self.skip_threshold,
                "signal": self.similarity}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        config.pod_key_source = [list(sources) for sources in plan["key_source"]]
        config.pod_sink_tokens = plan["sinks"]
        config.pod_recent_tokens = plan["recent"]
        config.pod_distant_skip = plan.get("skip_threshold")
        config.validate_architecture()

    def describe(self, plan: dict[str, Any]) -> list[str]:
        key_source = plan.get("key_source", [])
        borrowing = sum(source != layer for layer, sources in enumerate(key_source) for source in sources)
        total = sum(len(sources) for sources in key_source)
        lines = [f"{borrowing} of {total} (layer, KV head) pairs read their group's bottom layer's keys for distant "
                 f"tokens; proximal tokens (first {plan.get('sinks')}, last {plan.get('recent')}) keep their own "
                 f"(groups at similarity ≥ {plan.get('delta')} of {plan.get('signal', 'whole')} attention)"]
        if plan.get("skip_threshold") is not None:
            lines.append(f"a query row skips the distant tokens when its proximal attention mass is ≥ {plan['skip_threshold']}")
        for head in range(len(key_source[0]) if key_source else 0):
            lines.append(f"KV head {head}: groups " + " ".join(_groups_text([s[head] for s in key_source])))
        return lines

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        """The paper post-trains the whole model; here only q_proj and k_proj of the layers with borrowing heads.
        Their queries now meet two key sets, the bottom layer's (distant) and their own (proximal): training the
        own keys too lets the queries move towards the bottom layer's key space while the proximal keys follow.
        Measured on the demo model (10 steps × 1,024 tokens, held-out perplexity at 1k, 595 untrained): q_proj
        alone 41.7, q_proj + k_proj 32.7 at lr 1e-2; 322 and 239 at 1e-3."""
        layers = [layer for layer in range(config.num_hidden_layers) if config.borrowed_heads(layer)]
        return any(name.startswith(f"model.layers.{layer}.self_attn.{projection}.")
                   for layer in layers for projection in ("q_proj", "k_proj"))


def _groups_text(sources: list[int]) -> list[str]:
    """[0, 0, 0, 3, 3] -> ["0-2", "3-4"]: each group as its layer range."""
    groups, start = [], 0
    for layer in range(1, len(sources) + 1):
        if layer == len(sources) or sources[layer] == layer:
            groups.append(f"{start}-{layer - 1}" if layer - 1 > start else f"{start}")
            start = layer
    return groups
