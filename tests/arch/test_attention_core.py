"""The attention core: views merged by log-sum-exp, masks from positions, padding with eviction, on both paths.

The Triton path runs under TRITON_INTERPRET=1 (set in conftest.py). References are plain float64 softmax.
"""

import pytest
import torch

from factories import tiny_surgery_model

from surgery.arch import SurgeryForCausalLM
from surgery.arch.attention_surgery import KVView, Queries, attend
from surgery.arch.policies_surgery import POLICIES

PATHS = ["sdpa", "eager", "surgery_triton"]


def reference(query, keys, values, query_positions, key_positions, valid=None, window=None):
    """Plain float64 attention: query row t sees key s when pos(s) <= pos(t) (and within the window), if valid."""
    batch, heads, q_len, _ = query.shape
    group = heads // keys.shape[1]
    out = torch.zeros(batch, q_len, heads, values.shape[-1], dtype=torch.float64)
    lse = torch.zeros(batch, heads, q_len, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = h // group
            for t in range(q_len):
                allowed = key_positions <= query_positions[t]
                if window is not None:
                    allowed &= key_positions > query_positions[t] - window
                if valid is not None:
                    allowed &= valid[b, kv]
                scores = (query[b, h, t].double() @ keys[b, kv].double().T) * query.shape[-1] ** -0.5
                scores = scores.masked_fill(~allowed, float("-inf"))
                lse[b, h, t] = torch.logsumexp(scores, -1)
                out[b, t, h] = scores.softmax(-1) @ values[b, kv].double()
    return out, lse


def random_qkv(dtype, heads=6, kv_heads=2, q_len=6, slots=24, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, heads, q_len, dim, generator=generator).to(dtype)
    keys = torch.randn(2, kv_heads, slots, dim, generator=generator).to(dtype)
    values = torch.randn(2, kv_heads, slots, dim, generator=generator).to(dtype)
    return query, keys, values


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("path,dtype", [(path, dtype) for path in PATHS
                                        for dtype in (torch.float64, torch.float32, torch.bfloat16)
                                        if not (path == "surgery_triton" and dtype == torch.float64)])
def test_two_views_merge_exactly_by_log_sum_exp(path, dtype):
    query, keys, values = random_qkv(dtype)
    positions = torch.arange(24)
    query_positions = torch.arange(18, 24)
    distant = KVView(keys[:, :, :16], values[:, :, :16], positions[None, None, :16])
    near = KVView(keys[:, :, 16:], values[:, :, 16:], positions[None, None, 16:])
    out, lse = attend(Queries(query, query_positions[None], newest=False), [distant, near], 16**-0.5, path,
                      need_lse=True)
    expected, expected_lse = reference(query, keys, values, query_positions, positions)
    assert (out.double() - expected).abs().max() < TOLERANCE[dtype]
    assert (lse.double() - expected_lse).abs().max() < TOLERANCE[dtype] * 10
    joined, _ = attend(Queries(query, query_positions[None], newest=False), [distant, near], 16**-0.5, path)
    assert (joined.double() - expected).abs().max() < TOLERANCE[dtype]  # sdpa: one call over both views
    union, _ = attend(Queries(query, query_positions[None], newest=False), [KVView(keys, values)], 16**-0.5, path)
    assert (out.double() - union.double()).abs().max() < TOLERANCE[dtype]


@pytest.mark.parametrize("path", PATHS)
def test_a_decode_row_merges_views_without_concatenating_them(path):
    """One query row over a distant and a near view, grouped heads: the merge (fused on CPU) equals float64."""
    query, keys, values = random_qkv(torch.float32, heads=9, kv_heads=3, q_len=1, slots=40)
    positions = torch.arange(40)
    distant = KVView(keys[:, :, :30], values[:, :, :30], positions[None, None, :30], torch.rand(2, 3, 30) > 0.3)
    near = KVView(keys[:, :, 30:], values[:, :, 30:], positions[None, None, 30:])
    out, _ = attend(Queries(query, torch.tensor([[39]])), [distant, near], 16**-0.5, path)
    valid = torch.cat([distant.valid, torch.ones(2, 3, 10, dtype=torch.bool)], dim=-1)
    expected, _ = reference(query, keys, values, torch.tensor([39]), positions, valid)
    assert (out.double() - expected).abs().max() < 1e-5


def test_merged_views_carry_the_gradient_of_their_log_sum_exp():
    """Training through a merge (PoD's two views) needs d lse: the fused CPU op drops it, so autograd takes the
    explicit path. Gradients match float64 autograd through the plain formula."""
    query, keys, values = random_qkv(torch.float32)
    query.requires_grad_(True)
    positions = torch.arange(24)
    query_positions = torch.arange(18, 24)
    views = [KVView(keys[:, :, :16], values[:, :, :16], positions[None, None, :16]),
             KVView(keys[:, :, 16:], values[:, :, 16:], positions[None, None, 16:])]
    out, lse = attend(Queries(query, query_positions[None], newest=False), views, 16**-0.5, "sdpa", need_lse=True)
    (out.sum() + lse.sum()).backward()
    exact = query.detach().double().requires_grad_(True)
    expected, expected_lse = reference(exact, keys, values, query_positions, positions)
    (expected.sum() + expected_lse.sum()).backward()
    assert (query.grad.double() - exact.grad).abs().max() < 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [None, 3])
def test_masks_come_from_positions_for_a_token_subset(path, window):
    """A layer that holds only some tokens (kept or routed), queried by only some tokens, masks by position."""
    query, keys, values = random_qkv(torch.float32, q_len=3, slots=6)
    key_positions = torch.tensor([0, 2, 3, 7, 9, 11])
    query_positions = torch.tensor([3, 8, 11])
    valid = torch.ones(2, 2, 6, dtype=torch.bool)
    valid[1, 0, 1] = valid[0, 1, 4] = False  # one slot of one head per sequence was evicted
    view = KVView(keys, values, key_positions[None, None], valid)
    out, _ = attend(Queries(query, query_positions[None], newest=False), [view], 16**-0.5, path, window=window)
    expected, _ = reference(query, keys, values, query_positions, key_positions, valid, window)
    assert (out.double() - expected).abs().max() < 1e-5


def tiny(policy: str) -> SurgeryForCausalLM:
    return tiny_surgery_model(seed=3, head_dim=16, kv_policy=policy, kv_window=4, kv_budget=0.3, pad_token_id=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_padding_with_eviction_is_the_same_on_both_paths(policy):
    model = tiny(policy)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 97, (2, 40), generator=generator)
    ids[1, :9] = 0
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    kept, tokens = {}, {}
    for path in ("sdpa", "surgery_triton"):
        model.config._attn_implementation = path
        with torch.no_grad():
            cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        kept[path] = [[sorted(layer.positions[b, h][layer.valid[b, h]].tolist()) for b in range(2) for h in range(2)]
                      for layer in cache.layers]
        tokens[path] = out[:, 40:]
        assert all(min(heads[2]) >= 9 and min(heads[3]) >= 9 for heads in kept[path])  # no padding kept
    assert kept["sdpa"] == kept["surgery_triton"]
    assert torch.equal(tokens["sdpa"], tokens["surgery_triton"])


@pytest.mark.parametrize("path", PATHS)
def test_newest_queries_over_a_compacted_view_compare_positions(path):
    # a question fed after eviction: the view holds 10 kept slots of 24 tokens, the 6 queries are tokens 18-23
    query, keys, values = random_qkv(torch.float32)
    kept = torch.tensor([0, 3, 5, 9, 14, 18, 19, 20, 21, 22, 23])
    view = KVView(keys[:, :, kept], values[:, :, kept], kept[None, None])
    out, _ = attend(Queries(query, torch.arange(18, 24)[None], newest=True), [view], 16**-0.5, path)
    expected, _ = reference(query, keys[:, :, kept], values[:, :, kept], torch.arange(18, 24), kept)
    assert (out.double() - expected).abs().max() < 1e-5
