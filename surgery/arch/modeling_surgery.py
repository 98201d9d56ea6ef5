"""The surgery decoder: one llama-family model whose layers are configured by a conversion plan.

With an empty plan it computes exactly what the source family (llama, mistral, qwen2, qwen3) computes. The plan
changes individual layers: a *sharing* layer (KVSharer) has no k_proj/v_proj and attends to an earlier layer's
cached K/V. There is one attention path and one cache (`SurgeryCache`) for every plan.

Shipped flat inside every converted checkpoint, so it imports only torch and the public API of transformers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.masking_utils import sdpa_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .cache_surgery import SurgeryCache
from .configuration_surgery import SurgeryConfig
from .kvbudget_surgery import BudgetPolicy

try:  # flat in a checkpoint, the kernels sit beside this file
    from .decode_surgery import decode_attention, kernels_usable
    from .prefill_surgery import prefill_attention, window_attention_sums
except ImportError:  # inside the surgery package they live in surgery/kernels
    try:
        from surgery.kernels.decode_surgery import decode_attention, kernels_usable
        from surgery.kernels.prefill_surgery import prefill_attention, window_attention_sums
    except ImportError:
        decode_attention = kernels_usable = prefill_attention = window_attention_sums = None

TRITON_IMPLEMENTATION = "surgery_triton"


class SurgeryRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class SurgeryRotaryEmbedding(nn.Module):
    """RoPE cos/sin from the original token positions, for every rope type transformers knows."""

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
        """Plain RoPE; the name is the hook transformers' weight init calls to rebuild `inv_freq`."""
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (batch, heads, seq, head_dim) by the per-position cos/sin (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    sliding_window: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive (batch|1, 1, q, kv) mask: causal over cache slots, padding from the 2-D mask, optional window.

    Returns None when plain causal attention is exact (no padding, no window), so SDPA can take its fast path.
    """
    kv_length = past_length + query_length
    has_padding = attention_mask is not None and not bool(attention_mask[:, :kv_length].all())
    window_bites = sliding_window is not None and kv_length > sliding_window
    if not has_padding and not window_bites and (query_length == 1 or past_length == 0):
        return None
    query_slots = torch.arange(past_length, kv_length, device=device)[:, None]
    key_slots = torch.arange(kv_length, device=device)[None, :]
    allowed = key_slots <= query_slots
    if sliding_window is not None:
        allowed = allowed & (key_slots > query_slots - sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_length].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    implementation: str,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Grouped-query attention over (batch, heads, seq, dim) tensors; returns (batch, seq, heads, dim).

    `mask=None` means causal with queries aligned to the end of the keys (prefill or single-token decode).
    """
    n_rep = query.shape[1] // key.shape[1]
    is_causal = mask is None and query.shape[2] > 1
    if implementation == "eager":  # "sdpa" and "surgery_triton" (outside a decode step) take the SDPA branch
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if mask is not None:
            scores = scores + mask
        elif is_causal:
            q_len, k_len = scores.shape[-2:]
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = F.dropout(probs, p=dropout)
        out = torch.matmul(probs, value)
    else:
        if is_causal and query.shape[2] != key.shape[2]:
            raise ValueError("causal SDPA without a mask needs as many queries as keys")
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
            enable_gqa=n_rep > 1,
        )
    return out.transpose(1, 2)


def _interface_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`surgery_triton` as transformers' attention registry sees it: the model itself dispatches to the kernels."""
    return attend(query, key, value, attention_mask, scaling or query.shape[-1] ** -0.5, "sdpa", dropout), None


AttentionInterface.register(TRITON_IMPLEMENTATION, _interface_attention)
AttentionMaskInterface.register(TRITON_IMPLEMENTATION, sdpa_mask)  # without it transformers passes no padding mask


def use_kernels(implementation: str, query: torch.Tensor) -> bool:
    return implementation == TRITON_IMPLEMENTATION and decode_attention is not None and kernels_usable(query)


class HeadBasis(nn.Module):
    """Orthonormal columns (head_dim × stored rank) of one KV head's basis; the first `rank` columns are used.

    `rank` can be lowered at run time, which is how the rank search and Matryoshka training try smaller ranks.
    """

    def __init__(self, head_dim: int, rank: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, rank))
        self.rank = rank

    def forward(self) -> torch.Tensor:
        return self.weight[:, : self.rank]


class KVProjection(nn.Module):
    """MatryoshkaKV (Lin et al., arXiv 2410.14731): per-KV-head orthogonal bases applied after RoPE.

    k̃ = (RoPE(k) − μ_K)·U_K[:, :r_k] and ṽ = (v − μ_V)·U_V[:, :r_v] are cached, packed head after head along the
    last dim, so a layer's cache is exactly Σ r_k + Σ r_v wide. Attention uses q̃ = RoPE(q)·U_K[:, :r_k] and returns
    softmax(q̃·k̃ᵀ·scale)·ṽ·U_V[:, :r_v]ᵀ + μ_V. The paper's extra score term RoPE(q)·μ_Kᵀ is the same for every
    key of a query, so softmax cancels it and it is not computed. Bases are per KV head (not per query head as in
    the official code), so a GQA model keeps its GQA saving.
    """

    def __init__(self, head_dim: int, key_ranks: list[int], value_ranks: list[int]):
        super().__init__()
        self.key_bases = nn.ModuleList(HeadBasis(head_dim, r) for r in key_ranks)
        self.value_bases = nn.ModuleList(HeadBasis(head_dim, r) for r in value_ranks)
        self.key_mean = nn.Parameter(torch.zeros(len(key_ranks), head_dim))
        self.value_mean = nn.Parameter(torch.zeros(len(value_ranks), head_dim))

    @property
    def key_ranks(self) -> list[int]:
        return [basis.rank for basis in self.key_bases]

    @property
    def value_ranks(self) -> list[int]:
        return [basis.rank for basis in self.value_bases]

    def compress(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, kv_heads, seq, head_dim) post-RoPE keys and values -> packed (batch, 1, seq, Σ rank)."""
        keys = [(key[:, h] - self.key_mean[h]) @ basis() for h, basis in enumerate(self.key_bases)]
        values = [(value[:, h] - self.value_mean[h]) @ basis() for h, basis in enumerate(self.value_bases)]
        return torch.cat(keys, dim=-1).unsqueeze(1), torch.cat(values, dim=-1).unsqueeze(1)

    def attend(self, query, packed_keys, packed_values, mask, scaling, implementation, dropout=0.0) -> torch.Tensor:
        """Attention of (batch, heads, q, head_dim) queries over the packed cache; returns (batch, q, heads, head_dim)."""
        group = query.shape[1] // len(self.key_bases)
        outputs, key_offset, value_offset = [], 0, 0
        for h, (key_basis, value_basis) in enumerate(zip(self.key_bases, self.value_bases)):
            u_k, u_v = key_basis(), value_basis()
            keys = packed_keys[..., key_offset : key_offset + u_k.shape[1]]
            values = packed_values[..., value_offset : value_offset + u_v.shape[1]]
            key_offset, value_offset = key_offset + u_k.shape[1], value_offset + u_v.shape[1]
            reduced_query = query[:, h * group : (h + 1) * group] @ u_k
            head_mask = mask[:, h * group : (h + 1) * group] if mask is not None and mask.shape[1] > 1 else mask
            out = attend(reduced_query, keys, values, head_mask, scaling, implementation, dropout)
            outputs.append(out @ u_v.T + self.value_mean[h])
        return torch.cat(outputs, dim=2)

    def kernel_attend(self, query, packed_keys, packed_values, valid, scaling) -> torch.Tensor:
        """Attention through the Triton kernels on the packed reduced cache; returns (batch, q, heads, head_dim)."""
        batch, heads, q_len, _ = query.shape
        group = heads // len(self.key_bases)
        reduced = query.new_zeros(batch, heads, q_len, max(self.key_ranks))
        for h, basis in enumerate(self.key_bases):
            reduced[:, h * group : (h + 1) * group, :, : basis.rank] = query[:, h * group : (h + 1) * group] @ basis()
        widths = (self.key_ranks, self.value_ranks)
        if q_len == 1:
            out = decode_attention(reduced[:, :, 0], packed_keys, packed_values, scaling, valid, *widths)[:, :, None]
        else:
            out, _ = prefill_attention(reduced, packed_keys, packed_values, scaling, valid, *widths)
        heads_out = [out[:, h * group : (h + 1) * group, :, : basis.rank] @ basis().T + self.value_mean[h]
                     for h, basis in enumerate(self.value_bases)]
        return torch.cat(heads_out, dim=1).transpose(1, 2)


@dataclass
class LayerContext:
    """What every layer of one forward pass shares: masks per window size, the cache, the KV projections, and the
    budget policy when this forward is a prefill that evicts tokens."""

    masks: dict
    cache: SurgeryCache
    projections: list
    policy: BudgetPolicy | None = None
    padding: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def slot_mask(self, layer_valid: torch.Tensor | None, kv_heads: int, slots: int) -> torch.Tensor | None:
        """(batch, kv_heads, slots) slots a decode kernel may read: eviction's kept set, else the padding mask."""
        if layer_valid is not None:
            return layer_valid
        if self.attention_mask is None or bool(self.attention_mask[:, :slots].all()):
            return None
        return self.attention_mask[:, None, :slots].bool().expand(-1, kv_heads, -1)


def evicted_mask(valid: torch.Tensor, query_length: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, heads, q, slots) mask after eviction: kept slots, and causal among the q newest slots."""
    slots = valid.shape[-1]
    query_slots = torch.arange(slots - query_length, slots, device=valid.device)[:, None]
    causal = torch.arange(slots, device=valid.device)[None, :] <= query_slots
    allowed = valid[:, :, None, :] & causal[None, None]
    allowed = allowed.repeat_interleave(group, dim=1)
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


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
        self.scaling = self.head_dim**-0.5
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if is_sliding else None

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = SurgeryRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if self.owns_kv:
            kv_width = self.num_kv_heads * self.head_dim
            self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
            self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
            if config.qk_norm:
                self.k_norm = SurgeryRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            ranks = config.projected_ranks(layer_idx)
            self.kv_projection = KVProjection(self.head_dim, *ranks) if ranks else None

    @property
    def owns_kv(self) -> bool:
        return self.kv_source == self.layer_idx

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = projected.shape
        return projected.view(batch, seq, -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        context: LayerContext,
    ) -> torch.Tensor:
        cos, sin = position_embeddings
        query = self._heads(self.q_proj(hidden_states))
        if self.config.qk_norm:
            query = self.q_norm(query)
        query = apply_rope(query, cos, sin)

        projection = context.projections[self.kv_source]
        if self.owns_kv:
            key = self._heads(self.k_proj(hidden_states))
            value = self._heads(self.v_proj(hidden_states))
            if self.config.qk_norm:
                key = self.k_norm(key)
            key = apply_rope(key, cos, sin)
            full_key, widths = key, None
            if projection is not None:
                key, value = projection.compress(key, value)
                widths = (projection.key_ranks, projection.value_ranks)
            key, value = context.cache.update(key, value, self.layer_idx, widths=widths)
        else:
            key, value = context.cache.read(self.layer_idx)

        valid = context.cache.valid_slots(self.layer_idx)
        implementation = self.config._attn_implementation
        window_applies = self.sliding_window is not None and key.shape[2] > self.sliding_window
        lse = None
        if use_kernels(implementation, query) and not window_applies:
            slots = context.slot_mask(valid, self.num_kv_heads, key.shape[2])
            if projection is not None:
                out = projection.kernel_attend(query, key, value, slots, self.scaling)
            elif query.shape[2] == 1:
                out = decode_attention(query[:, :, 0], key, value, self.scaling, valid=slots)[:, None]
            else:
                out, lse = prefill_attention(query, key, value, self.scaling, valid=slots)
                out = out.transpose(1, 2)
        else:
            if valid is None:
                mask = context.masks[self.sliding_window]
            else:
                mask = evicted_mask(valid, query.shape[2], self.num_heads // self.num_kv_heads, query.dtype)
            dropout = self.config.attention_dropout if self.training else 0.0
            if projection is not None:
                out = projection.attend(query, key, value, mask, self.scaling, implementation, dropout)
            else:
                out = attend(query, key, value, mask, self.scaling, implementation, dropout)

        if self.owns_kv and context.policy is not None:
            sums = None
            if lse is not None:  # the prefill kernel's row log-sum-exp gives the window sums block by block
                sums = window_attention_sums(query, full_key, lse, self.scaling, context.policy.window, all_slots=True)
            scores = context.policy.score(query, full_key, context.padding, self.scaling, sums=sums)
            context.policy.observe(self.layer_idx, scores, context.cache)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))


class SurgeryMLP(nn.Module):
    def __init__(self, config: SurgeryConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SurgeryDecoderLayer(nn.Module):
    def __init__(self, config: SurgeryConfig, layer_idx: int):
        super().__init__()
        self.self_attn = SurgeryAttention(config, layer_idx)
        self.mlp = SurgeryMLP(config)
        self.input_layernorm = SurgeryRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = SurgeryRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, context: LayerContext) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings, context)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class SurgeryPreTrainedModel(PreTrainedModel):
    """On CUDA with triton installed the Triton kernels are the default; "sdpa" and "eager" stay selectable."""

    config_class = SurgeryConfig
    config: SurgeryConfig
    base_model_prefix = "model"
    _no_split_modules = ["SurgeryDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = False

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

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention is None and decode_attention is not None and torch.cuda.is_available():
            return TRITON_IMPLEMENTATION
        return super().get_correct_attn_implementation(requested_attention, is_init_check)


class SurgeryModel(SurgeryPreTrainedModel):
    def __init__(self, config: SurgeryConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(SurgeryDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = SurgeryRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = SurgeryRotaryEmbedding(config)
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
        kv_policy: BudgetPolicy | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = bool(output_hidden_states)

        cache = self._resolve_cache(past_key_values)
        past_length = cache.get_seq_length()
        query_length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + query_length, device=inputs_embeds.device)[None]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("the surgery model takes a 2-D (batch, keys) padding mask")

        windows = {layer.self_attn.sliding_window for layer in self.layers}
        masks = {
            window: build_attention_mask(
                attention_mask, query_length, past_length, window, inputs_embeds.dtype, inputs_embeds.device
            )
            for window in windows
        }
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        projections = [getattr(layer.self_attn, "kv_projection", None) for layer in self.layers]
        policy = kv_policy or self._budget_policy(kv_budget, kv_budget_tokens, past_length, query_length,
                                                  attention_mask, inputs_embeds.shape[0], inputs_embeds.device)
        padding = attention_mask[:, :query_length] if attention_mask is not None and policy is not None else None
        self.last_budget_policy = policy  # the last prefill's per-layer budgets and scores, for inspection
        context = LayerContext(masks=masks, cache=cache, projections=projections, policy=policy, padding=padding,
                               attention_mask=attention_mask)

        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, context)
        if policy is not None:
            policy.finish(cache)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )

    def _budget_policy(self, budget, budget_tokens, past_length, query_length, attention_mask, batch, device):
        """A policy when this forward is a prefill that must evict: a budget below the whole prompt is set (by the
        call or by the config) for a policy, and there is no earlier cache."""
        name = self.config.kv_policy
        if budget is None and budget_tokens is None:
            budget, budget_tokens = self.config.kv_budget, self.config.kv_budget_tokens
        if name is None or past_length > 0 or query_length < 2:
            return None
        if budget_tokens is None and (budget is None or budget >= 1):
            return None
        if budget_tokens is not None and budget_tokens >= query_length:
            return None
        lengths = attention_mask[:, :query_length].sum(-1) if attention_mask is not None else torch.full((batch,), query_length, device=device)
        owners = self.config.owner_layers
        return BudgetPolicy(name, budget, budget_tokens, owners, lengths.cpu(), self.config.kv_window,
                            self.config.kv_layer_weights, self.config.kv_pooling)

    def _resolve_cache(self, past_key_values: Cache | None) -> SurgeryCache:
        """Our cache, whatever generate() offers: it pre-builds an empty DynamicCache, which cannot hold our plan."""
        if isinstance(past_key_values, SurgeryCache):
            return past_key_values
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            return SurgeryCache(self.config.kv_source)
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

    def set_kv_sources(self, kv_source: list[int]) -> None:
        """Re-point layers at other layers' caches in place, as a plan search does between trial forwards.

        Layers keep their projections, so any plan whose owners still have k_proj/v_proj can be tried.
        """
        for layer, source in zip(self.model.layers, kv_source):
            attention = layer.self_attn
            if source == attention.layer_idx and not hasattr(attention, "k_proj"):
                raise ValueError(f"layer {attention.layer_idx} has no K/V projections and cannot own a cache")
            attention.kv_source = source
        self.config.kv_source = list(kv_source)

    def set_kv_ranks(self, key_ranks: list[list[int] | None], value_ranks: list[list[int] | None]) -> None:
        """Project (or stop projecting) each layer's K/V at the given per-head ranks, in place.

        A layer without a projection gets full-rank identity bases first; a rank can only go down to what is stored.
        """
        for layer, keys, values in zip(self.model.layers, key_ranks, value_ranks):
            attention = layer.self_attn
            if keys is None:
                attention.kv_projection = None
                continue
            if getattr(attention, "kv_projection", None) is None:
                full = [attention.head_dim] * attention.num_kv_heads
                weight = attention.q_proj.weight
                attention.kv_projection = KVProjection(attention.head_dim, full, full).to(weight.device, weight.dtype)
            for bases, ranks in ((attention.kv_projection.key_bases, keys), (attention.kv_projection.value_bases, values)):
                for basis, rank in zip(bases, ranks):
                    if not 0 < rank <= basis.weight.shape[1]:
                        raise ValueError(f"rank {rank} is outside 1..{basis.weight.shape[1]} (what the basis stores)")
                    basis.rank = rank
        self.config.kv_key_ranks = [None if r is None else list(r) for r in key_ranks]
        self.config.kv_value_ranks = [None if r is None else list(r) for r in value_ranks]

    @torch.no_grad()
    def compress_context(self, input_ids: torch.LongTensor, kv_budget: float | None = None,
                         kv_budget_tokens: int | None = None, probe_ids: torch.LongTensor | None = None,
                         policy: str | None = None) -> SurgeryCache:
        """Prefill a context and evict down to the budget before any question is known (prefix caching, chat).

        Returns a cache that later `generate(context + question, past_key_values=cache)` calls continue from.
        `probe_ids` (batch 1): a generic question appended only to score the context, e.g. "What are the key facts
        and numbers above?"; its tokens are the observation window, then leave the cache again. Without a probe the
        last context tokens are the window, as in SnapKV.
        """
        name = policy or self.config.kv_policy or "snapkv"
        context_length = input_ids.shape[1]
        if kv_budget is None and kv_budget_tokens is None:
            kv_budget, kv_budget_tokens = self.config.kv_budget, self.config.kv_budget_tokens
        tokens = kv_budget_tokens if kv_budget_tokens is not None else round(kv_budget * context_length)
        owners = self.config.owner_layers
        ids, window = input_ids, self.config.kv_window
        if probe_ids is not None:
            ids = torch.cat([input_ids, probe_ids.to(input_ids.device)], dim=1)
            window = probe_ids.shape[1]
            tokens += window
        lengths = torch.full((ids.shape[0],), ids.shape[1])
        budget_policy = BudgetPolicy(name, None, tokens, owners, lengths, window, self.config.kv_layer_weights,
                                     self.config.kv_pooling)
        cache = self(ids, use_cache=True, kv_policy=budget_policy).past_key_values
        if probe_ids is not None:
            cache.drop_last(probe_ids.shape[1])
        return cache

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
        kv_policy: BudgetPolicy | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            kv_budget=kv_budget,
            kv_budget_tokens=kv_budget_tokens,
            kv_policy=kv_policy,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = ["KVProjection", "SurgeryForCausalLM", "SurgeryModel", "SurgeryPreTrainedModel", "SurgeryCache"]
