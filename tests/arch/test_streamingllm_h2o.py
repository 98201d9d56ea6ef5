"""StreamingLLM and H2O, the two baseline policies: what each keeps, against the paper's rule written plainly, and
end to end through convert, generate and the cache's measured bytes."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import cli, load_remote
from surgery.arch.h2o_surgery import accumulated_attention
from surgery.arch.modeling_surgery import apply_rope
from surgery.arch.policies_surgery import build_policy
from test_budget_policies import kept_positions, tiny


def test_streamingllm_keeps_the_sinks_and_the_most_recent_tokens_with_left_padding():
    model = tiny("streamingllm", seed=1, window=None)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (2, 60), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, kv_budget_tokens=20).past_key_values
    for sequence, first in ((0, 0), (1, 9)):
        expected = set(range(first, first + 4)) | set(range(60 - 16, 60))  # 4 sinks + the 16 most recent
        for layer in range(6):
            slot = cache.layers[layer]
            for head in range(2):
                kept = set(slot.positions[sequence, head][slot.valid[sequence, head]].tolist())
                assert kept == expected, (sequence, layer, head)


def plain_accumulated_attention(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """H2O's score written out in float64: the full causal attention matrix of every head, summed over queries."""
    heads, n = query.shape[1], query.shape[2]
    keys = key.double().repeat_interleave(heads // key.shape[1], dim=1)
    scores = query.double() @ keys.transpose(2, 3) / math.sqrt(query.shape[-1])
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1).sum(2)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produced."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_h2o_scores_equal_the_full_attention_matrix_but_never_form_it():
    generator = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 4, 64, 8, generator=generator), torch.randn(1, 2, 64, 8, generator=generator)
    with LargestTensor() as probe:
        chunked = accumulated_attention(query, key, None, 1 / math.sqrt(8), chunk=8)
    assert torch.allclose(chunked.double(), plain_accumulated_attention(query, key), atol=1e-5)
    assert probe.largest < 4 * 64 * 64  # a chunk of 8 rows × 64 keys per head, not 64 × 64
    assert probe.largest <= 4 * 64 * 8 * 2


def test_h2o_keeps_the_recent_half_and_the_heaviest_hitters():
    model = tiny("h2o", seed=4, window=None)
    with torch.no_grad():  # peaked attention, so heads disagree on which tokens are heavy
        for parameter in model.parameters():
            parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(parameter.numel()))
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(5))
    n, budget = 50, 16
    with torch.no_grad():
        cache = model(ids, kv_budget_tokens=budget).past_key_values
        hidden = model.model(ids, output_hidden_states=True).hidden_states
    kept = kept_positions(cache, range(6))
    recent = budget // 2
    for layer in (0, 2, 5):
        attention = model.model.layers[layer].self_attn
        x = model.model.layers[layer].input_layernorm(hidden[layer])
        cos, sin = model.model.rotary_emb(x, torch.arange(n)[None])["full_attention"]
        q = apply_rope(attention.q_proj(x).view(1, n, -1, 8).transpose(1, 2), cos, sin)
        k = apply_rope(attention.k_proj(x).view(1, n, -1, 8).transpose(1, 2), cos, sin)
        scores = plain_accumulated_attention(q, k)[0]
        for kv in range(2):
            per_kv = scores[kv * 3 : kv * 3 + 3].sum(0)[: n - recent]
            heavy = set(per_kv.topk(budget - recent).indices.tolist())
            assert kept[layer][kv] == heavy | set(range(n - recent, n)), (layer, kv)


@pytest.mark.parametrize("policy", ["streamingllm", "h2o"])
def test_policy_is_registered_and_splits_the_total_evenly(policy):
    state = build_policy(policy, 0.25, None, list(range(4)), torch.tensor([80]))
    assert state.counts(0) == {layer: 20 for layer in range(4)}


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["streamingllm", "h2o"])
def test_convert_generate_and_measure_from_the_cache(policy, tiny_models, tmp_path):
    listing = cli("recipes")
    assert listing.exit_code == 0 and policy in listing.output.split()
    out = tmp_path / policy
    result = cli("convert", tiny_models["llama"], "--recipe", policy, "--keep", "0.25", "--keep-at-least", "0",
                 "--out", out)
    assert result.exit_code == 0, result.output
    model = load_remote(out)
    ids = torch.randint(3, 128, (1, 80), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    per_layer = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, float32
    assert cache.kv_bytes() == 4 * 20 * per_layer  # 4 layers × 25% of 80 tokens
    assert generated.shape == (1, 84)
