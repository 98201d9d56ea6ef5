"""Config of the surgery decoder: a llama-style family description plus a per-layer plan.

This file is shipped flat inside every converted checkpoint, so it imports only torch,
huggingface_hub and the public API of transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

# The checkpoint layout this code reads and writes. Bumped whenever the layout changes, so an older surgery refuses
# a newer checkpoint instead of misreading it.
SURGERY_FORMAT = 3  # 2: recipe config keys named after their recipe (checkpoint/loading.FORMAT_1_KEYS); 3: Gemma and
# Phi-3 fields, sliding layers hold only their window, gates and routers on full-attention layers only


@strict
class SurgeryConfig(PreTrainedConfig):
    r"""
    The family fields (`hidden_size`, `attention_bias`, ...) describe the source model: llama, mistral, qwen2,
    qwen3, the MoE families, gemma2, gemma3 and phi3. Beyond biases, the per-head q/k norm and sliding windows,
    their named differences are:

    norm_unit_offset (`bool`):
        RMSNorm scales by (1 + weight), in float32 before the cast back (Gemma); else by weight after it (llama).
    sandwich_norms (`bool`):
        Each block also normalises its attention and MLP outputs before they join the residual stream (Gemma):
        `post_attention_layernorm` is then the attention's output norm, and `pre_feedforward_layernorm` and
        `post_feedforward_layernorm` surround the MLP.
    embedding_scale (`float`, *optional*):
        Token embeddings are multiplied by it, cast to the embedding dtype first (Gemma: sqrt(hidden_size)).
    query_pre_attn_scalar (`float`, *optional*):
        Attention scores are scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5 (Gemma).
    attn_logit_softcapping, final_logit_softcapping (`float`, *optional*):
        Scores (after scaling) and final logits pass through cap · tanh(x / cap) (Gemma 2).
    rope_parameters:
        One RoPE for every layer, or one per layer type keyed by `layer_types`' names (Gemma 3: local layers have
        their own base). `partial_rotary_factor` < 1 rotates only the first part of each head (Phi-3 / Phi-4).
    sliding_window, layer_types:
        A "sliding_attention" layer attends to its last `sliding_window` tokens and its cache holds only the
        window, as transformers' sliding cache layers do.

    The plan fields say how each layer deviates from the source:

    kv_source (`list[int]`, *optional*):
        For each layer, the layer whose key/value cache it attends to. A layer equal to its own index computes
        and caches its own K/V; any other value makes it a *sharing* layer (KVSharer): it has no `k_proj` or
        `v_proj` and stores nothing in the cache. `None` means every layer owns its K/V.
    matryoshka_key_ranks, matryoshka_value_ranks (`list[list[int] | None]`, *optional*):
        MatryoshkaKV: for each layer that owns its K/V, the rank kept per KV head of the orthogonal key and value
        bases; keys and values are cached at that reduced width. `None` (or a `None` entry) means no projection.
    kv_policy, kv_budget, kv_budget_tokens, kv_min_tokens, kv_window, kv_pooling, kv_layer_weights (*optional*):
        Token eviction after prefill: the policy (a name in policies_surgery.POLICIES), the default budget as a
        fraction of the prompt (or an absolute token count per layer), the floor under a fraction (a prompt of at
        most kv_min_tokens stays whole), the observation window, and ZigZagKV's calibrated per-layer shares.
        `generate(..., kv_budget=0.1)` overrides the budget per call.
    pod_key_source (`list[list[int]]`, *optional*):
        PoD: for each layer and KV head, the layer whose keys serve that head's distant tokens (the bottom layer of
        its group). A head whose entry is its own layer keeps every key; any other head keeps its own keys only
        for the proximal tokens (`pod_sink_tokens` first, `pod_recent_tokens` last) and reads the bottom layer's
        keys, with its own queries and values, for the rest. `None` means no layer borrows keys.
    pod_sink_tokens, pod_recent_tokens (`int`):
        PoD's proximal tokens: the first and the last tokens of each sequence a query sees with its own keys.
    pod_distant_skip (`float`, *optional*):
        PoD's optional skip τ: a query row (per head) whose proximal attention mass is at least τ ignores the
        distant tokens. `None` (the default) never skips.
    attention_gate_heads, attention_gate_width, attention_gate_threshold (*optional*):
        Attention-Gate: every K/V-owning layer has a causal gate of `attention_gate_heads` heads of width `attention_gate_width`
        over its input; a token whose keep probability for a KV head is below `attention_gate_threshold` is read by its
        own query only and leaves that head's cache. `None` heads means no gate.
    modification_layers, modification_threshold (*optional*):
        MoDification: the routed layers, each with a router g = σ(w·x̂ + b) over its normalised input; a token with
        g ≥ `modification_threshold` goes through the layer (its update scaled by g / stopgrad(g), 1 in value), any other
        token skips it and leaves no K/V in its cache. `None` means no layer is routed.
    moe_layers, moe_experts, moe_top_k, moe_intermediate_size, moe_norm_topk, moe_shared_intermediate_size (*optional*):
        Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): the layers whose MLP is `moe_experts` experts of width
        `moe_intermediate_size`, of which a router picks `moe_top_k` per token (softmax over all logits, then top-k,
        renormalised to sum 1 when `moe_norm_topk`); an optional shared expert (Qwen2-MoE) of width
        `moe_shared_intermediate_size` runs for every token, scaled by σ(shared_expert_gate). `None` layers: dense.
    adamoe_null_experts (`int`):
        AdaMoE: m null experts, m extra router rows after the true experts' E. The top-k runs over all E + m; null
        experts compute nothing, and the chosen true experts' weights are renormalised to sum 1 (0 when a token
        chose only null experts). 0: plain top-k routing.
    grown_layers (`list[int]`, *optional*):
        Depth growth (LESA, LLaMA-Pro, SOLAR): the layers added to the source, which `surgery adapt` trains. They
        are ordinary layers; the field only records which are new.
    surgery_format (`int`):
        The checkpoint layout version (`SURGERY_FORMAT` of the code that wrote it).
    surgery_recipes (`list[str]`):
        The recipes applied at conversion, for provenance.
    source_model_type (`str`):
        The `model_type` of the source checkpoint.
    """

    model_type = "surgery"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    embedding_scale: int | float | None = None
    query_pre_attn_scalar: int | float | None = None
    attn_logit_softcapping: int | float | None = None
    final_logit_softcapping: int | float | None = None

    kv_source: list[int] | None = None
    matryoshka_key_ranks: list[list[int] | None] | None = None
    matryoshka_value_ranks: list[list[int] | None] | None = None
    kv_policy: str | None = None
    kv_budget: float | None = None
    kv_budget_tokens: int | None = None
    kv_min_tokens: int | None = None
    kv_window: int | None = None
    kv_pooling: str = "avg"
    kv_layer_weights: list[float] | None = None
    pod_key_source: list[list[int]] | None = None
    pod_sink_tokens: int = 16
    pod_recent_tokens: int = 256
    pod_distant_skip: float | None = None
    attention_gate_heads: int | None = None
    attention_gate_width: int | None = None
    attention_gate_threshold: float = 0.5
    modification_layers: list[int] | None = None
    modification_threshold: float = 0.5
    grown_layers: list[int] | None = None
    moe_layers: list[int] | None = None
    moe_experts: int | None = None
    moe_top_k: int = 2
    moe_intermediate_size: int | None = None
    moe_norm_topk: bool = True
    moe_shared_intermediate_size: int | None = None
    adamoe_null_experts: int = 0
    surgery_recipes: list[str] | None = None
    surgery_format: int = SURGERY_FORMAT
    source_model_type: str | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.kv_source is None:
            self.kv_source = list(range(self.num_hidden_layers))
        if self.surgery_recipes is None:
            self.surgery_recipes = []
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Reject plans that cannot run: a layer may only read the cache of an earlier layer that owns its K/V."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "embedding_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if len(self.kv_source) != self.num_hidden_layers:
            raise ValueError(f"kv_source has {len(self.kv_source)} entries for {self.num_hidden_layers} layers")
        for layer, source in enumerate(self.kv_source):
            if not 0 <= source <= layer:
                raise ValueError(f"layer {layer} cannot read the cache of layer {source}: it must be an earlier layer")
            if self.kv_source[source] != source:
                raise ValueError(f"layer {layer} reads layer {source}, which itself shares; point it at the root")
            if self.layer_types[layer] != self.layer_types[source]:
                raise ValueError(f"layer {layer} ({self.layer_types[layer]}) cannot read the cache of layer {source} "
                                 f"({self.layer_types[source]}): a layer shares only with a layer of its kind")
        for name in ("matryoshka_key_ranks", "matryoshka_value_ranks"):
            ranks = getattr(self, name)
            if ranks is None:
                continue
            if len(ranks) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(ranks)} entries for {self.num_hidden_layers} layers")
            for layer, layer_ranks in enumerate(ranks):
                if layer_ranks is None:
                    continue
                if len(layer_ranks) != self.num_key_value_heads or not all(0 < r <= self.head_dim for r in layer_ranks):
                    raise ValueError(f"{name}[{layer}] needs one rank in 1..{self.head_dim} per KV head")
        if self.pod_key_source is not None:
            self._validate_key_source()
        elif self.pod_distant_skip is not None:
            raise ValueError("pod_distant_skip needs PoD's pod_key_source: only PoD layers have a distant part")
        if self.attention_gate_heads is not None:
            self._validate_gate()
        if self.modification_layers is not None:
            self._validate_routing()
        if self.moe_layers is not None:
            self._validate_experts()
        elif self.adamoe_null_experts:
            raise ValueError("adamoe_null_experts needs moe_layers: null experts join a mixture of experts")
        if self.grown_layers is not None and (not isinstance(self.grown_layers, list) or not all(
                isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < self.num_hidden_layers
                for layer in self.grown_layers)):
            raise ValueError(f"grown_layers must list layers in 0..{self.num_hidden_layers - 1}")


    def _validate_key_source(self) -> None:
        """PoD's groups: each head borrows the keys of an earlier layer that keeps all of that head's keys itself."""
        if len(self.pod_key_source) != self.num_hidden_layers:
            raise ValueError(f"pod_key_source has {len(self.pod_key_source)} entries for {self.num_hidden_layers} layers")
        for layer, sources in enumerate(self.pod_key_source):
            if len(sources) != self.num_key_value_heads:
                raise ValueError(f"pod_key_source[{layer}] needs one layer per KV head ({self.num_key_value_heads})")
            for head, source in enumerate(sources):
                if not 0 <= source <= layer or self.pod_key_source[source][head] != source:
                    raise ValueError(f"pod_key_source[{layer}][{head}] = {source}: a head borrows the keys of an "
                                     "earlier layer that keeps that head's keys itself")
                if source != layer and (self.is_sliding(layer) or self.is_sliding(source)):
                    raise ValueError(f"pod_key_source[{layer}][{head}] = {source}: only full-attention layers share "
                                     "distant keys (a sliding layer has none)")
            if self.kv_source[layer] != layer or self.projected_ranks(layer) is not None:
                raise ValueError("pod_key_source (PoD) cannot be combined with kv_source sharing or projected ranks")
        if self.pod_sink_tokens < 0 or self.pod_recent_tokens < 1:
            raise ValueError("pod_sink_tokens must be at least 0 and pod_recent_tokens at least 1")
        if self.pod_distant_skip is not None and not 0.0 < self.pod_distant_skip <= 1.0:
            raise ValueError(f"pod_distant_skip must lie in (0, 1], got {self.pod_distant_skip}")

    def _validate_gate(self) -> None:
        """Attention-Gate: a small gate, with nothing else evicting the same cache."""
        if self.attention_gate_heads < 1 or self.attention_gate_width is None or self.attention_gate_width < 1:
            raise ValueError("attention_gate_heads and attention_gate_width must be at least 1")
        if not 0.0 < self.attention_gate_threshold < 1.0:
            raise ValueError(f"attention_gate_threshold must lie in (0, 1), got {self.attention_gate_threshold}")
        if self.kv_policy is not None or self.pod_key_source is not None:
            raise ValueError("an Attention-Gate evicts on its own: it cannot be combined with kv_policy or pod_key_source")

    def _validate_experts(self) -> None:
        if len(set(self.moe_layers)) != len(self.moe_layers) or not all(
                0 <= layer < self.num_hidden_layers for layer in self.moe_layers):
            raise ValueError(f"moe_layers must list distinct layers in 0..{self.num_hidden_layers - 1}")
        if isinstance(self.adamoe_null_experts, bool) or not isinstance(self.adamoe_null_experts, int) or self.adamoe_null_experts < 0:
            raise ValueError(f"adamoe_null_experts must be an integer ≥ 0, got {self.adamoe_null_experts!r}")
        routed = (self.moe_experts or 0) + self.adamoe_null_experts
        if not self.moe_experts or not self.moe_intermediate_size or not 1 <= self.moe_top_k <= routed:
            raise ValueError(f"a mixture of experts needs experts ≥ 1, a width, and 1 ≤ top-k ≤ experts + null experts "
                             f"(got {self.moe_experts}, {self.moe_intermediate_size}, {self.moe_top_k}, "
                             f"{self.adamoe_null_experts})")

    def _validate_routing(self) -> None:
        """MoDification: routed layers own their K/V, which no other layer reads, and nothing else evicts."""
        if not self.modification_layers or sorted(set(self.modification_layers)) != self.modification_layers or not all(
                0 <= layer < self.num_hidden_layers for layer in self.modification_layers):
            raise ValueError(f"modification_layers must list distinct layers in 0..{self.num_hidden_layers - 1} in order")
        if not 0.0 < self.modification_threshold < 1.0:
            raise ValueError(f"modification_threshold must lie in (0, 1), got {self.modification_threshold}")
        shared = {source for layer, source in enumerate(self.kv_source) if source != layer}
        for layer in self.modification_layers:
            if self.is_sliding(layer):
                raise ValueError(f"routed layer {layer} is a sliding-window layer: only full-attention layers are "
                                 "routed (a sliding layer's cache already holds only its window)")
            if self.kv_source[layer] != layer or layer in shared:
                raise ValueError(f"routed layer {layer} may not share K/V (KVSharer): its cache holds only the "
                                 "tokens it routed")
        if self.kv_policy is not None or self.pod_key_source is not None or self.attention_gate_heads is not None:
            raise ValueError("routed layers (modification_layers) cannot be combined with kv_policy, pod_key_source or an "
                             "Attention-Gate")

    def borrowed_heads(self, layer: int) -> dict[int, int]:
        """PoD: {KV head: layer whose keys it reads for distant tokens} for the heads of `layer` that borrow."""
        if self.pod_key_source is None:
            return {}
        return {head: source for head, source in enumerate(self.pod_key_source[layer]) if source != layer}

    def projected_ranks(self, layer: int) -> tuple[list[int], list[int]] | None:
        """The (key, value) ranks per KV head of a layer whose cache is projected, else None."""
        if self.matryoshka_key_ranks is None or self.matryoshka_key_ranks[layer] is None:
            return None
        return self.matryoshka_key_ranks[layer], self.matryoshka_value_ranks[layer]

    def runtime_modules(self) -> list[str]:
        """The recipe runtime modules (`<name>_surgery.py`) this plan runs, beyond the core every checkpoint has."""
        modules = []
        if self.matryoshka_key_ranks is not None and any(r is not None for r in self.matryoshka_key_ranks):
            modules.append("matryoshka")
        if self.pod_key_source is not None:
            modules.append("pod")
        if self.attention_gate_heads is not None:
            modules.append("attention_gate")
        if self.modification_layers is not None:
            modules.append("modification")
        if self.kv_policy is not None:
            modules.append(self.kv_policy)  # its file imports policies_surgery and budget_surgery
        return modules

    def rope_for(self, layer_type: str) -> dict:
        """The RoPE parameters of a layer type: its own entry where they are given per type (Gemma 3), else the
        one set every layer uses."""
        own = self.rope_parameters.get(layer_type)
        return own if isinstance(own, dict) else self.rope_parameters

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention" and self.sliding_window is not None

    @property
    def owner_layers(self) -> list[int]:
        """Layers that compute and cache their own K/V."""
        return [layer for layer, source in enumerate(self.kv_source) if source == layer]

    @property
    def full_attention_owners(self) -> list[int]:
        """K/V-owning layers without a sliding window: the caches that grow with the sequence. Token budgets,
        Attention-Gates, mixture-of-depths routing and PoD act on these; a sliding layer keeps its window."""
        return [layer for layer in self.owner_layers if not self.is_sliding(layer)]

    @property
    def sharing_layers(self) -> list[int]:
        """Layers that attend to another layer's cache and hold no K/V of their own."""
        return [layer for layer, source in enumerate(self.kv_source) if source != layer]


__all__ = ["SURGERY_FORMAT", "SurgeryConfig"]
