"""Triton kernels under TRITON_INTERPRET=1 on CPU, against a float64 reference, with poisoned outputs."""

import math

import pytest
import torch

from factories import tiny_surgery_model

from surgery.arch.matryoshka_surgery import set_kv_ranks
from surgery.kernels.decode_surgery import decode_attention  # TRITON_INTERPRET=1 is set in conftest.py


def capped(scores, softcap):
    """Gemma 2's soft-cap, written plainly: cap · tanh(s / cap)."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def reference(query, keys, values, scale, valid=None, key_widths=None, value_widths=None, softcap=None):
    """Plain float64 attention per query head over its KV head's valid slots."""
    batch, heads, _ = query.shape
    kv_heads = len(key_widths) if key_widths else keys.shape[1]
    group = heads // kv_heads
    width_v = max(value_widths) if value_widths else values.shape[-1]
    out = torch.zeros(batch, heads, width_v, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            if key_widths:
                k_start, v_start = sum(key_widths[:kv]), sum(value_widths[:kv])
                k = keys[b, 0, :, k_start : k_start + key_widths[kv]].double()
                v = values[b, 0, :, v_start : v_start + value_widths[kv]].double()
                q = query[b, h, : key_widths[kv]].double()
            else:
                k, v, q = keys[b, kv].double(), values[b, kv].double(), query[b, h].double()
            keep = valid[b, kv] if valid is not None else torch.ones(k.shape[0], dtype=torch.bool)
            if keep.sum() == 0:
                continue
            scores = capped((k[keep] @ q) * scale, softcap)
            out[b, h, : v.shape[1]] = scores.softmax(0) @ v[keep]
    return out


def poisoned_empty(monkeypatch):
    """Fill every fresh buffer with NaN, so a value the kernel forgot to write shows up."""
    original = torch.empty

    def empty(*args, **kwargs):
        tensor = original(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 48), (4, 80), (3, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_decode(monkeypatch, group, head_dim, dtype):
    poisoned_empty(monkeypatch)
    generator = torch.Generator().manual_seed(group * head_dim)
    batch, kv_heads, slots = 2, 2, 37
    query = torch.randn(batch, kv_heads * group, head_dim, generator=generator).to(dtype)
    keys = torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(dtype)
    values = torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(dtype)
    scale = 1 / math.sqrt(head_dim)
    got = decode_attention(query, keys, values, scale, split_size=16, block_n=16)
    expected = reference(query, keys, values, scale)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.double() - expected).abs().max() < tolerance
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query.float()[:, :, None], keys.float().repeat_interleave(group, 1), values.float().repeat_interleave(group, 1),
        scale=scale)[:, :, 0]
    assert (got.float() - sdpa).abs().max() < (3e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("kept", [[0, 1], [1, 5], [7, 0], [19, 11]])
def test_ragged_decode(monkeypatch, kept):
    """Each (sequence, KV head) attends only to its own kept slots; 0, 1 and odd counts included."""
    poisoned_empty(monkeypatch)
    generator = torch.Generator().manual_seed(sum(kept))
    batch, kv_heads, group, slots, dim = 1, 2, 3, 21, 64
    query = torch.randn(batch, kv_heads * group, dim, generator=generator)
    keys = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    values = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    valid = torch.zeros(batch, kv_heads, slots, dtype=torch.bool)
    for head, count in enumerate(kept):
        valid[0, head, torch.randperm(slots, generator=generator)[:count]] = True
    got = decode_attention(query, keys, values, 0.125, valid=valid, split_size=8, block_n=16)
    expected = reference(query, keys, values, 0.125, valid=valid)
    assert torch.isfinite(got).all() and (got.double() - expected).abs().max() < 1e-5


def test_reduced_width_decode_with_ranks_per_head(monkeypatch):
    poisoned_empty(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    key_widths, value_widths, group, slots = [8, 24, 40], [16, 8, 56], 3, 29
    query = torch.zeros(2, 3 * group, max(key_widths))
    for head in range(3 * group):
        query[:, head, : key_widths[head // group]] = torch.randn(2, key_widths[head // group], generator=generator)
    keys = torch.randn(2, 1, slots, sum(key_widths), generator=generator)
    values = torch.randn(2, 1, slots, sum(value_widths), generator=generator)
    valid = torch.rand(2, 3, slots, generator=generator) > 0.3
    got = decode_attention(query, keys, values, 0.125, valid=valid, key_widths=key_widths,
                           value_widths=value_widths, split_size=16, block_n=16)
    expected = reference(query, keys, values, 0.125, valid, key_widths, value_widths)
    for head in range(3 * group):  # each head's output is only as wide as its value rank
        width = value_widths[head // group]
        assert (got[:, head, :width].double() - expected[:, head, :width]).abs().max() < 1e-5


def tiny_model(**extra):
    return tiny_surgery_model(max_positions=128, **extra)


def generate_both_ways(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Greedy generation with its logits, through the PyTorch path ("sdpa") and the Triton kernels."""
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    results = {}
    for implementation in ("sdpa", "surgery_triton"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            results[implementation] = model.generate(ids, **kwargs)
    return results


@pytest.mark.parametrize("layout", ["dense", "shared", "projected", "evicted", "padded", "pyramid-padded"])
def test_model_decode_with_kernels_matches_pytorch(layout):
    """Greedy decoding through the Triton decode kernel gives the PyTorch path's logits, layout by layout."""
    extra = {"kv_source": [0, 1, 0, 1]} if layout == "shared" else {}
    if layout == "evicted":
        extra = {"kv_policy": "snapkv", "kv_window": 4, "kv_budget": 0.4}
    if layout == "pyramid-padded":  # per-layer budgets and left padding: ragged valid slots in every layer
        extra = {"kv_policy": "pyramid", "kv_window": 2, "kv_budget": 0.4}
    model = tiny_model(**extra)
    if layout == "projected":
        set_kv_ranks(model, [[3, 5]] * 4, [[4, 2]] * 4)
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if layout in ("padded", "pyramid-padded"):
        mask[1, :7] = 0
    results = generate_both_ways(model, ids, mask)
    assert torch.equal(results["sdpa"].sequences, results["surgery_triton"].sequences)
    for expected, got in zip(results["sdpa"].logits, results["surgery_triton"].logits):
        assert (expected - got).abs().max() < 1e-4


def test_decode_kernel_is_really_used(monkeypatch):
    import surgery.arch.attention_surgery as modeling

    calls = []
    original = modeling.decode_attention
    monkeypatch.setattr(modeling, "decode_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = tiny_model()
    model.config._attn_implementation = "surgery_triton"
    ids = torch.randint(3, 97, (1, 8))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 2 * 4  # two decode steps after the prefill, four layers


def reference_prefill(query, keys, values, scale, valid=None, key_widths=None, value_widths=None, softcap=None):
    """float64 causal attention of the newest q_len slots, per query head over its KV head."""
    batch, heads, q_len, _ = query.shape
    kv_heads = len(key_widths) if key_widths else keys.shape[1]
    group, slots = heads // kv_heads, keys.shape[2]
    width_v = max(value_widths) if value_widths else values.shape[-1]
    out = torch.zeros(batch, heads, q_len, width_v, dtype=torch.float64)
    probs = torch.zeros(batch, heads, q_len, slots, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            if key_widths:
                ks, vs = sum(key_widths[:kv]), sum(value_widths[:kv])
                k = keys[b, 0, :, ks : ks + key_widths[kv]].double()
                v = values[b, 0, :, vs : vs + value_widths[kv]].double()
                q = query[b, h, :, : key_widths[kv]].double()
            else:
                k, v, q = keys[b, kv].double(), values[b, kv].double(), query[b, h].double()
            scores = capped(q @ k.T * scale, softcap)
            allowed = torch.arange(slots)[None, :] <= torch.arange(slots - q_len, slots)[:, None]
            if valid is not None:
                allowed = allowed & valid[b, kv][None, :]
            p = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
            probs[b, h] = p
            out[b, h, :, : v.shape[1]] = p @ v
    return out, probs


@pytest.mark.parametrize("group,head_dim,past", [(1, 64, 0), (3, 48, 5), (4, 80, 0), (3, 128, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_and_window_scores(monkeypatch, group, head_dim, past, dtype):
    from surgery.kernels.prefill_surgery import prefill_attention, window_sums_from_lse

    poisoned_empty(monkeypatch)
    generator = torch.Generator().manual_seed(head_dim + past)
    batch, kv_heads, q_len = 2, 2, 23
    slots = past + q_len
    query = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=generator).to(dtype)
    keys = torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(dtype)
    values = torch.randn(batch, kv_heads, slots, head_dim, generator=generator).to(dtype)
    valid = torch.rand(batch, kv_heads, slots, generator=generator) > 0.2 if past else None
    if valid is not None:
        valid[..., past:] = True  # the new tokens are always there
    scale = head_dim**-0.5
    out, lse = prefill_attention(query, keys, values, scale, valid=valid, block_m=16, block_n=16)
    expected, probs = reference_prefill(query, keys, values, scale, valid)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert out.dtype == dtype and (out.double() - expected).abs().max() < tolerance
    window = 7
    sums = window_sums_from_lse(query, keys, lse, scale, window, valid=valid, block_m=16, block_n=16, all_slots=True)
    reference_sums = probs[:, :, -window:, :].sum(2)  # masked slots have probability 0 and must get no mass
    assert (sums.double() - reference_sums).abs().max() < (3e-2 if dtype == torch.bfloat16 else 1e-5)
    if valid is not None:
        assert bool((sums[~valid.repeat_interleave(group, dim=1)] == 0).all())


def test_prefill_reduced_width(monkeypatch):
    from surgery.kernels.prefill_surgery import prefill_attention

    poisoned_empty(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    key_widths, value_widths, group, q_len = [8, 24], [16, 40], 3, 19
    query = torch.zeros(1, 2 * group, q_len, max(key_widths))
    for head in range(2 * group):
        query[:, head, :, : key_widths[head // group]] = torch.randn(1, q_len, key_widths[head // group], generator=generator)
    keys = torch.randn(1, 1, q_len, sum(key_widths), generator=generator)
    values = torch.randn(1, 1, q_len, sum(value_widths), generator=generator)
    out, _ = prefill_attention(query, keys, values, 0.125, key_widths=key_widths, value_widths=value_widths,
                               block_m=16, block_n=16)
    expected, _ = reference_prefill(query, keys, values, 0.125, None, key_widths, value_widths)
    for head in range(2 * group):
        width = value_widths[head // group]
        assert (out[:, head, :, :width].double() - expected[:, head, :, :width]).abs().max() < 1e-5


def test_surgery_triton_is_the_cuda_default_and_selectable(tiny_models, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from helpers import run_convert

    out = run_convert(tiny_models["llama"], tmp_path / "ckpt")
    assert (out / "decode_surgery.py").is_file() and (out / "prefill_surgery.py").is_file()
    chosen = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="surgery_triton")
    assert chosen.config._attn_implementation == "surgery_triton"
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).config._attn_implementation == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert chosen.get_correct_attn_implementation(None) == "surgery_triton"  # what a CUDA machine gets by default
    assert chosen.get_correct_attn_implementation("eager") == "eager"


@pytest.mark.parametrize("group", [1, 3])
def test_soft_capped_kernels(monkeypatch, group):
    """Gemma 2's score cap in the decode, prefill and window-sum kernels, against the formula in float64."""
    from surgery.kernels.prefill_surgery import prefill_attention, window_sums_from_lse

    poisoned_empty(monkeypatch)
    generator = torch.Generator().manual_seed(group)
    batch, kv_heads, q_len, past, head_dim, cap = 2, 2, 21, 6, 32, 1.5
    slots = past + q_len
    query = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=generator) * 2
    keys = torch.randn(batch, kv_heads, slots, head_dim, generator=generator) * 2
    values = torch.randn(batch, kv_heads, slots, head_dim, generator=generator)
    scale = head_dim**-0.5
    out, lse = prefill_attention(query, keys, values, scale, block_m=16, block_n=16, softcap=cap)
    expected, probs = reference_prefill(query, keys, values, scale, softcap=cap)
    uncapped, _ = reference_prefill(query, keys, values, scale)
    assert (out.double() - expected).abs().max() < 1e-5
    assert (expected - uncapped).abs().max() > 0.1  # the cap really changes the attention here
    sums = window_sums_from_lse(query, keys, lse, scale, 5, block_m=16, block_n=16, all_slots=True, softcap=cap)
    assert (sums.double() - probs[:, :, -5:, :].sum(2)).abs().max() < 1e-5
    step = decode_attention(query[:, :, -1], keys, values, scale, split_size=16, block_n=16, softcap=cap)
    assert (step.double() - reference(query[:, :, -1], keys, values, scale, softcap=cap)).abs().max() < 1e-5


def test_gemma2_with_kernels_matches_pytorch(tiny_models, tmp_path):
    """A Gemma 2 checkpoint (soft-capped scores, sliding and global layers, left padding) decodes through the
    Triton kernels as through the PyTorch path; and the PyTorch path as transformers' Gemma 2 does."""
    from transformers import AutoModelForCausalLM

    from helpers import run_convert
    from surgery.arch import SurgeryForCausalLM

    out = run_convert(tiny_models["gemma2"], tmp_path / "gemma2", recipe="none")
    model = SurgeryForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"], dtype=torch.float32).eval()
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    results = generate_both_ways(model, ids, mask)
    with torch.no_grad():
        results["transformers"] = reference_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                                           pad_token_id=0, output_logits=True,
                                                           return_dict_in_generate=True)
    for name in ("surgery_triton", "transformers"):
        assert torch.equal(results["sdpa"].sequences, results[name].sequences), name
        for expected, got in zip(results["sdpa"].logits, results[name].logits):
            assert (expected - got).abs().max() < 1e-4, name
