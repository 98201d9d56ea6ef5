"""The surgery decoder: one llama-family model whose layers are configured by a conversion plan.

With an empty plan it computes exactly what the source family (llama, mistral, qwen2, qwen3, the MoE families,
gemma2, gemma3, phi3) computes; the families' differences are named config fields (Gemma's (1 + w) and sandwich
norms, scaled embeddings, score scalar and soft-caps, per-type RoPE; Phi-3's partial rotary and longrope), read
where they act. It reads like transformers' `modeling_llama.py`: project, RoPE, cache, attend, output. The core beside it
is the attention over cache views (`attention_surgery.py`), the cache and its stores (`cache_surgery.py`,
`kvlayer_surgery.py`) and the MLP or mixture of experts (`mlp_surgery.py`). What a recipe adds at run time lives in
its own module (`pod_surgery.py`, `attention_gate_surgery.py`, ...), which plugs in through the hooks of
`runtime_surgery.Runtime`: a cache store, a module on a layer, an eviction policy at prefill. The block below names
the runtime modules this model may run; a checkpoint's copy names only those its plan uses.

Shipped flat inside every converted checkpoint, so it imports only torch and the public API of transformers.
"""

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .attention_surgery import TRITON_IMPLEMENTATION, Queries, attend, decode_attention, soft_cap
from .cache_surgery import SurgeryCache
from .configuration_surgery import SurgeryConfig
from .mlp_surgery import layer_mlp

# >>> runtime modules: the recipes' runtime modules this model may run (surgery writes this list per checkpoint)
from .budget_surgery import LayerScores  # noqa: E402,F401
from .kvlayer_surgery import PlainCacheLayer  # noqa: E402,F401
from .policies_surgery import PolicyRuntime  # noqa: E402,F401
from .runtime_surgery import Runtime  # noqa: E402,F401
from .attention_gate_surgery import RUNTIME as attention_gate_runtime  # noqa: E402
from .dynamickv_surgery import RUNTIME as dynamickv_runtime  # noqa: E402
from .h2o_surgery import RUNTIME as h2o_runtime  # noqa: E402
from .matryoshka_surgery import RUNTIME as matryoshka_runtime  # noqa: E402
from .modification_surgery import RUNTIME as modification_runtime  # noqa: E402
from .pod_surgery import RUNTIME as pod_runtime  # noqa: E402
from .pyramid_surgery import RUNTIME as pyramid_runtime  # noqa: E402
from .snapkv_surgery import RUNTIME as snapkv_runtime  # noqa: E402
from .streamingllm_surgery import RUNTIME as streamingllm_runtime  # noqa: E402
from .zigzag_surgery import RUNTIME as zigzag_runtime  # noqa: E402
RUNTIMES = (
    attention_gate_runtime,
    dynamickv_runtime,
    h2o_runtime,
    matryoshka_runtime,
    modification_runtime,
    pod_runtime,
    pyramid_runtime,
    snapkv_runtime,
    streamingllm_runtime,
    zigzag_runtime,
)
# <<< runtime modules

try:  # the kernels need triton; transformers skips imports inside try blocks when it checks requirements
    from .decode_surgery import kernels_usable  # noqa: F401
    from .prefill_surgery import prefill_attention  # noqa: F401
except ImportError:
    pass


# transformers 5.24 renamed `past_key_values` to `cache` (generate passes `cache=`, outputs carry `.cache`); both
# forwards take either name and outputs use the installed version's field.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class SurgeryRMSNorm(nn.Module):
    """RMSNorm. llama's scales by `weight` after casting back to the input dtype; with `unit_offset` (Gemma) it
    scales by (1 + weight) in float32 and then casts, and the weight starts at zero."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.unit_offset:
            return (hidden_states * (1.0 + self.weight.float())).to(input_dtype)
        return self.weight * hidden_states.to(input_dtype)


def rms_norm(config: SurgeryConfig, size: int) -> SurgeryRMSNorm:
    """The family's RMSNorm over `size` features."""
    return SurgeryRMSNorm(size, eps=config.rms_norm_eps, unit_offset=config.norm_unit_offset)


def scale_embeddings(embeddings: torch.Tensor, config: SurgeryConfig) -> torch.Tensor:
    """Token embeddings times the family's scale (Gemma: sqrt(hidden_size), rounded to the embedding dtype first,
    as the family does), unchanged without one."""
    if config.embedding_scale is None:
        return embeddings
    scale = torch.tensor(config.embedding_scale, dtype=torch.float32, device=embeddings.device)
    return embeddings * scale.to(embeddings.dtype)


class SurgeryRotaryEmbedding(nn.Module):
    """RoPE cos/sin of one set of RoPE parameters from the original token positions, for every rope type
    transformers knows. `config` holds that set flat (`rope_view` for one layer type of Gemma 3)."""

    inv_freq: torch.Tensor

    def __init__(self, config: SurgeryConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: SurgeryConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE over the rotated part of each head; the name is the hook transformers' weight init calls to
        rebuild `inv_freq`."""
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def longrope_limit(config: SurgeryConfig) -> int | None:
    """original_max_position_embeddings of a longrope model (the length past which its long factors apply)."""
    for kind in sorted(set(config.layer_types)):
        parameters = config.rope_for(kind)
        if parameters.get("rope_type") == "longrope":
            return parameters.get("original_max_position_embeddings") or config.max_position_embeddings
    return None


def rope_view(config: SurgeryConfig, layer_type: str) -> SurgeryConfig:
    """A shallow copy of `config` whose `rope_parameters` are the flat set of one layer type."""
    view = copy.copy(config)
    view.__dict__["rope_parameters"] = dict(config.rope_for(layer_type))
    return view


class SurgeryPositionEmbeddings(nn.Module):
    """cos/sin for each layer type: one RoPE computed once where every layer shares it, else one per type
    (Gemma 3's local layers have their own base). Returns {layer type: (cos, sin)}."""

    def __init__(self, config: SurgeryConfig):
        super().__init__()
        self.layer_types = sorted(set(config.layer_types))
        per_type = any(isinstance(config.rope_parameters.get(kind), dict) for kind in self.layer_types)
        kinds = self.layer_types if per_type else ["shared"]
        self.rotaries = nn.ModuleDict({kind: SurgeryRotaryEmbedding(rope_view(config, kind) if per_type else config)
                                       for kind in kinds})

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if "shared" in self.rotaries:
            pair = self.rotaries["shared"](x, position_ids)
            return {kind: pair for kind in self.layer_types}
        return {kind: self.rotaries[kind](x, position_ids) for kind in self.layer_types}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (batch, heads, seq, head_dim) by the per-position cos/sin (batch, seq, rotary_dim); a partial
    rotary (Phi-3's `partial_rotary_factor`) rotates the first rotary_dim features and passes the rest."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)


@dataclass
class LayerContext:
    """What every layer of one forward pass shares.

    positions: (1, q) token index of each query row (the mask coordinate; RoPE uses position_ids).
    padding: (batch, slots) bool padding mask, None when nothing is padded.
    projections: each layer's KV projection (MatryoshkaKV) or None, indexed by the owner layer.
    policy: the KV budget policy when this forward is a prefill that evicts; it scores every owner layer.
    masks: additive masks built this forward, shared by the layers that read the same cache layout.
    newest: whether the query rows are the newest tokens in order (False inside a routed layer: a subset).
    route: inside a routed layer (MoDification), the tokens it runs; None elsewhere.
    """

    cache: SurgeryCache
    positions: torch.Tensor
    padding: torch.Tensor | None
    projections: list
    policy: object | None = None  # a budget_surgery.BudgetPolicy
    prompt_padding: torch.Tensor | None = None
    masks: dict = field(default_factory=dict)
    newest: bool = True
    route: object | None = None  # a modification_surgery.Route

    def real_tokens(self) -> torch.Tensor | None:
        """(batch, q) bool: this forward's tokens that are not left padding; None when nothing is padded."""
        return None if self.padding is None else self.padding[:, self.positions[0]]

    def routed(self, route, first_slot: int | None) -> "LayerContext":
        """The context of a routed layer's run over the tokens it routed, with its own masks. Queries carry the
        tokens' positions; or, when `first_slot` is given (the layer's cache and this route have no holes, and no
        sliding window applies), the slot indices first_slot, first_slot + 1, ...: the routed tokens are then the
        newest slots in order, so plain causal attention over the slots is exact and needs no mask."""
        if first_slot is not None:
            slots = torch.arange(first_slot, first_slot + route.index.shape[1], device=route.index.device)[None]
            return replace(self, positions=slots, masks={}, newest=True, route=route)
        return replace(self, positions=route.positions, masks={}, newest=False, route=route)


def active_runtimes(config: SurgeryConfig) -> tuple:
    """The runtimes this config's plan uses, in the order they are asked; a plan that needs a runtime module this
    checkpoint does not ship is refused by name rather than run without it."""
    shipped = {runtime.module for runtime in RUNTIMES}
    missing = [module for module in config.runtime_modules() if module not in shipped]
    if missing:
        raise ValueError(f"the plan in config.json needs {', '.join(m + '_surgery.py' for m in missing)}, which this "
                         "checkpoint does not ship: re-export it with `surgery convert`")
    return tuple(runtime for runtime in RUNTIMES if runtime.used_by(config))


def attention_implementation(config: SurgeryConfig) -> str:
    """The attention implementation transformers resolved for this model. `_attn_implementation` is the one
    place transformers keeps it (there is no public accessor in 5.x); read here only."""
    return config._attn_implementation


class SurgeryAttention(nn.Module):
    """Attention whose K/V come from its own projections or, for a sharing layer, from an earlier layer's cache."""

    def __init__(self, config: SurgeryConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kv_source = config.kv_source[layer_idx]
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcapping
        self.sliding_window = config.sliding_window if config.is_sliding(layer_idx) else None

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = rms_norm(config, self.head_dim)
        if self.owns_kv:
            kv_width = self.num_kv_heads * self.head_dim
            self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
            self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
            if config.qk_norm:
                self.k_norm = rms_norm(config, self.head_dim)
        self.kv_projection = None  # reduced-width K/V bases (MatryoshkaKV), set by a runtime
        self.gate = None  # learned eviction (Attention-Gate), set by a runtime
        for runtime in active_runtimes(config):
            runtime.build_attention(self, config)

    @property
    def owns_kv(self) -> bool:
        return self.kv_source == self.layer_idx

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = projected.shape
        return projected.view(batch, seq, -1, self.head_dim).transpose(1, 2)

    def project_query(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-RoPE queries (batch, heads, seq, head_dim)."""
        query = self._heads(self.q_proj(hidden_states))
        if self.config.qk_norm:
            query = self.q_norm(query)
        return apply_rope(query, cos, sin)

    def project_key(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys (batch, kv_heads, seq, head_dim) of an owner layer."""
        key = self._heads(self.k_proj(hidden_states))
        if self.config.qk_norm:
            key = self.k_norm(key)
        return apply_rope(key, cos, sin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        context: LayerContext,
    ) -> torch.Tensor:
        cos, sin = position_embeddings
        query = self.project_query(hidden_states, cos, sin)

        projection = context.projections[self.kv_source]
        if self.owns_kv:
            retention = None
            if self.gate is not None:
                retention = self.gate(hidden_states, context.cache.layers[self.layer_idx], context.positions,
                                      context.padding)
            key = self.project_key(hidden_states, cos, sin)
            value = self._heads(self.v_proj(hidden_states))
            full_key, widths = key, None
            if projection is not None:
                key, value = projection.compress(key, value)
                widths = projection.widths
            context.cache.update(key, value, self.layer_idx, widths=widths, retention=retention, route=context.route)
        views = context.cache.views(self.layer_idx, context.padding, projection)

        queries = Queries(query, context.positions, newest=context.newest, masks=context.masks, softcap=self.softcap)
        dropout = self.config.attention_dropout if self.training else 0.0
        out, lse = attend(queries, views, self.scaling, attention_implementation(self.config), self.sliding_window,
                          dropout, skip=context.cache.view_skip)
        if context.policy is not None and self.layer_idx in context.policy.owners:  # full-attention owners
            context.policy.score_layer(self.layer_idx, query, full_key, context.prompt_padding, self.scaling,
                                       context.cache, lse, self.softcap)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))


class SurgeryDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; with `sandwich_norms` (Gemma) their outputs are normalised too, and
    `post_attention_layernorm` is the attention's output norm rather than the MLP's input norm."""

    def __init__(self, config: SurgeryConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = SurgeryAttention(config, layer_idx)
        self.mlp = layer_mlp(config, layer_idx)
        self.input_layernorm = rms_norm(config, config.hidden_size)
        self.post_attention_layernorm = rms_norm(config, config.hidden_size)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = rms_norm(config, config.hidden_size)
            self.post_feedforward_layernorm = rms_norm(config, config.hidden_size)
        self.router = None  # mixture-of-depths routing (MoDification), set by a runtime
        for runtime in active_runtimes(config):
            runtime.build_layer(self, config)

    def forward(self, hidden_states, position_embeddings: dict, context: LayerContext) -> torch.Tensor:
        """`position_embeddings`: {layer type: (cos, sin)}, as `SurgeryPositionEmbeddings` gives them."""
        position_embeddings = position_embeddings[self.layer_type]
        if self.router is None:
            return self.block(hidden_states, position_embeddings, context)
        route = self.router(self.input_layernorm(hidden_states), context.positions, context.real_tokens())
        if route.empty:  # no sequence routed a token: the layer computes nothing
            context.cache.layers[self.self_attn.layer_idx].pass_over(route.tokens)
            return hidden_states
        cos, sin = position_embeddings
        routed = route.gather(hidden_states)
        store = context.cache.layers[self.self_attn.layer_idx]
        first_slot = store.first_slot(route)
        out = self.block(routed, (route.gather(cos), route.gather(sin)), context.routed(route, first_slot))
        return route.scatter(hidden_states, out - routed)

    def block(self, hidden_states, position_embeddings, context: LayerContext) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, context)
        if not self.sandwich:
            hidden_states = hidden_states + attended
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.post_attention_layernorm(attended)
        return hidden_states + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))


def recomputable_layer(layer: SurgeryDecoderLayer, hidden_states: torch.Tensor, position_embeddings, context: LayerContext,
                       cached: int) -> torch.Tensor:
    """A decoder layer under gradient checkpointing. Backward runs the layer again: first drop what its first run
    appended to the cache, so the rerun sees the same keys. Non-reentrant checkpointing (not transformers' default
    function) keeps the K/V that sharing layers read from this layer's cache in the autograd graph."""
    slot = context.cache.layers[layer.self_attn.layer_idx]
    if layer.self_attn.owns_kv and slot.get_seq_length() > cached:
        slot.drop_last(slot.get_seq_length() - cached)
    return layer(hidden_states, position_embeddings, context)


class SurgeryPreTrainedModel(PreTrainedModel):
    """On CUDA with triton installed the Triton kernels are the default; "sdpa" and "eager" stay selectable."""

    config_class = SurgeryConfig
    config: SurgeryConfig
    base_model_prefix = "model"
    _no_split_modules = ["SurgeryDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_attention_backend = False
    supports_gradient_checkpointing = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load, and refuse a checkpoint that lacks weights its config needs, rather than run them randomly
        initialised (e.g. a sharing layer whose `kv_source` was edited back to itself has no k_proj/v_proj)."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights its config needs, e.g. {missing[0]}: "
                             "the plan in config.json (kv_source, ranks) does not match the stored weights")
        return (model, info) if wants_info else model

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init, except that a (1 + weight) norm starts at zero: its identity scale."""
        super()._init_weights(module)
        if isinstance(module, SurgeryRMSNorm) and module.unit_offset:
            init.zeros_(module.weight)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """The one override of a transformers hook: on CUDA with triton, default to our kernels."""
        if requested_attention is None and decode_attention is not None and torch.cuda.is_available():
            return TRITON_IMPLEMENTATION
        return super().get_correct_attn_implementation(requested_attention, is_init_check)


class SurgeryModel(SurgeryPreTrainedModel):
    def __init__(self, config: SurgeryConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(SurgeryDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = rms_norm(config, config.hidden_size)
        self.rotary_emb = SurgeryPositionEmbeddings(config)
        self.runtimes = active_runtimes(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        kv_budget: float | None = None,
        kv_budget_tokens: int | None = None,
        kv_policy=None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = scale_embeddings(self.embed_tokens(input_ids), self.config)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = bool(output_hidden_states)

        cache = self._resolve_cache(cache if cache is not None else past_key_values)
        past_length = cache.get_seq_length()
        batch, query_length = inputs_embeds.shape[:2]
        positions = torch.arange(past_length, past_length + query_length, device=inputs_embeds.device)[None]
        if position_ids is None:
            position_ids = positions
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("the surgery model takes a 2-D (batch, keys) padding mask")
        padded = attention_mask is not None and not bool(attention_mask[:, : past_length + query_length].all())
        policy = kv_policy or next((p for p in (runtime.prefill_policy(
            self.config, kv_budget, kv_budget_tokens, past_length, query_length, attention_mask, batch,
            inputs_embeds.device) for runtime in self.runtimes) if p is not None), None)
        context = LayerContext(
            cache=cache,
            positions=positions,
            padding=attention_mask.bool() if padded else None,
            projections=[getattr(layer.self_attn, "kv_projection", None) for layer in self.layers],
            policy=policy,
            prompt_padding=attention_mask[:, :query_length] if attention_mask is not None and policy else None,
        )

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if self.gradient_checkpointing and self.training:
                cached = context.cache.layers[layer.self_attn.layer_idx].get_seq_length()
                hidden_states = checkpoint(recomputable_layer, layer, hidden_states, position_embeddings, context,
                                           cached, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, position_embeddings, context)
        if policy is not None:
            policy.finish(cache)
        if use_cache:
            cache.settle()
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )

    def _resolve_cache(self, past_key_values: Cache | None) -> SurgeryCache:
        """Our cache, whatever generate() offers: it pre-builds an empty DynamicCache, which cannot hold our plan."""
        if isinstance(past_key_values, SurgeryCache):
            return past_key_values
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            return SurgeryCache.for_config(self.config, self.runtimes)
        raise ValueError(
            f"a filled {type(past_key_values).__name__} cannot be used with this model; pass a SurgeryCache"
        )


class SurgeryForCausalLM(SurgeryPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SurgeryConfig):
        super().__init__(config)
        self.model = SurgeryModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs):
        """With longrope (Phi-3), the step at which a sequence first passes original_max_position_embeddings
        recomputes the whole cache with the long factors, as transformers' Phi-3 does, so that every key carries
        the RoPE the later queries use."""
        limit = longrope_limit(self.config)
        if limit is not None and input_ids.shape[1] > limit:
            for name in ("cache", "past_key_values"):
                if kwargs.get(name) is not None and kwargs[name].get_seq_length() <= limit:
                    kwargs[name] = None
                    if "next_sequence_length" in kwargs:
                        kwargs["next_sequence_length"] = None
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    def compress_context(self, input_ids: torch.LongTensor, kv_budget: float | None = None,
                         kv_budget_tokens: int | None = None, probe_ids: torch.LongTensor | None = None,
                         policy: str | None = None) -> SurgeryCache:
        """Prefill a context and evict down to the budget before any question is known; see
        `policies_surgery.compress_context` (shipped in checkpoints that evict with a token-budget policy)."""
        runtime = next((r for r in RUNTIMES if hasattr(r, "compress_context")), None)
        if runtime is None:
            raise ValueError("compress_context needs a token-budget policy, which this checkpoint does not ship: "
                             "convert with one (e.g. --recipe snapkv)")
        return runtime.compress_context(self, input_ids, kv_budget, kv_budget_tokens, probe_ids, policy)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        kv_budget: float | None = None,
        kv_budget_tokens: int | None = None,
        kv_policy=None,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            kv_budget=kv_budget,
            kv_budget_tokens=kv_budget_tokens,
            kv_policy=kv_policy,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = soft_cap(self.lm_head(hidden_states[:, keep, :]), self.config.final_logit_softcapping)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


__all__ = ["SurgeryForCausalLM", "SurgeryModel", "SurgeryPreTrainedModel", "SurgeryCache", "TRITON_IMPLEMENTATION"]
