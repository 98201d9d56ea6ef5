"""MatryoshkaKV in the arch: projected heads, packed reduced-width cache, and the paper's formula."""

import pytest
import torch

from factories import tiny_surgery_model

from helpers import decode_stepwise
from surgery.arch import SurgeryForCausalLM
from surgery.arch.modeling_surgery import apply_rope
from surgery.arch.matryoshka_surgery import set_kv_ranks


def tiny(kv_source=None, seed=0, **extra) -> SurgeryForCausalLM:
    return tiny_surgery_model(seed, max_positions=64, kv_source=kv_source, **extra)


def random_orthogonal(d: int, generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q.float()


def install_random_bases(model, key_ranks, value_ranks, seed=0):
    set_kv_ranks(model, key_ranks, value_ranks)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            projection = getattr(layer.self_attn, "kv_projection", None)
            if projection is None:
                continue
            for basis in [*projection.key_bases, *projection.value_bases]:
                basis.weight.copy_(random_orthogonal(8, generator))
            projection.key_mean.normal_(generator=generator)
            projection.value_mean.normal_(generator=generator)


def test_full_rank_reproduces_base_logits():
    model = tiny(seed=1)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        base = model(ids).logits
        install_random_bases(model, [[8, 8]] * 4, [[8, 8]] * 4)
        projected = model(ids).logits
    assert (base - projected).abs().max() < 1e-4


def test_reduced_rank_caches_reduced_width_and_decodes_like_full_forward():
    model = tiny(seed=2)
    key_ranks, value_ranks = [[3, 5], [8, 1], [2, 2], [6, 4]], [[4, 4], [1, 8], [5, 3], [2, 7]]
    install_random_bases(model, key_ranks, value_ranks, seed=3)
    ids = torch.randint(0, 97, (2, 14))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
    stepwise, cache = decode_stepwise(model, ids, 6, mask)
    assert (stepwise - full)[mask.bool()].abs().max() < 1e-5
    for layer, (keys, values) in enumerate(zip(key_ranks, value_ranks)):
        assert tuple(cache.layers[layer].keys.shape) == (2, 1, 14, sum(keys))
        assert tuple(cache.layers[layer].values.shape) == (2, 1, 14, sum(values))
    expected_bytes = sum(sum(k) + sum(v) for k, v in zip(key_ranks, value_ranks)) * 4
    assert cache.kv_bytes_per_token() == expected_bytes


def test_attention_follows_the_paper_formula_in_float64():
    """scores = (q̃·k̃ᵀ + RoPE(q)·μ_Kᵀ)·scale, out = softmax(scores)·ṽ·U_Vᵀ + μ_V, per KV head, written plainly."""
    model = tiny(seed=4).double()
    install_random_bases(model, [[3, 6]] * 4, [[5, 2]] * 4, seed=5)
    model = model.double()
    attention = model.model.layers[0].self_attn
    projection = attention.kv_projection
    x = torch.randn(1, 7, 48, dtype=torch.float64)
    positions = torch.arange(7)[None]
    cos, sin = model.model.rotary_emb(x, positions)["full_attention"]

    q = apply_rope(attention._heads(attention.q_proj(x)), cos, sin)
    k = apply_rope(attention._heads(attention.k_proj(x)), cos, sin)
    v = attention._heads(attention.v_proj(x))
    heads = []
    for qh in range(6):
        h = qh // 3
        u_k, u_v = projection.key_bases[h].weight[:, :3 if h == 0 else 6], projection.value_bases[h].weight[:, :5 if h == 0 else 2]
        mu_k, mu_v = projection.key_mean[h], projection.value_mean[h]
        q_t, k_t, v_t = q[0, qh] @ u_k, (k[0, h] - mu_k) @ u_k, (v[0, h] - mu_v) @ u_v
        scores = (q_t @ k_t.T + (q[0, qh] @ mu_k)[:, None]) * 8**-0.5
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v_t @ u_v.T + mu_v)
    expected = attention.o_proj(torch.stack(heads, 1).reshape(1, 7, 48))

    from surgery.arch.cache_surgery import SurgeryCache
    from surgery.arch.modeling_surgery import LayerContext

    context = LayerContext(cache=SurgeryCache(list(range(4))), positions=torch.arange(7)[None], padding=None,
                           projections=[layer.self_attn.kv_projection for layer in model.model.layers])
    got = attention(x, (cos, sin), context)
    assert (got - expected).abs().max() < 1e-10


def test_sharing_layer_reads_the_projected_cache_of_its_source():
    model = tiny(kv_source=[0, 1, 0, 1], seed=6)
    install_random_bases(model, [[3, 4], [5, 2], None, None], [[2, 6], [4, 4], None, None], seed=7)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    stepwise, cache = decode_stepwise(model, ids, 5)
    assert (stepwise - full).abs().max() < 1e-5
    assert cache.layers[2].keys is None and cache.layers[0].keys.shape[-1] == 7


def test_rank_above_stored_is_refused():
    model = tiny()
    set_kv_ranks(model, [[4, 4]] * 4, [[4, 4]] * 4)
    with pytest.raises(ValueError, match="outside"):
        set_kv_ranks(model, [[9, 4]] * 4, [[4, 4]] * 4)
