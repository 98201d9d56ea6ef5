"""MoDification routing in the decoder and the cache, against a plain float64 reference written from the rule: in a
routed layer, token t goes through the layer when σ(w·norm(h_t) + b) ≥ p, and then attends to the tokens s ≤ t
that the same layer routed (by their positions); a token that is not routed keeps its hidden state. One softmax
over what it sees, computed token by token."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from helpers import decode_stepwise, widened_surgery_model
from surgery.arch import SurgeryConfig, SurgeryForCausalLM
from surgery.arch.modeling_surgery import apply_rope

PATHS = {"eager": (torch.float64, 1e-10), "sdpa": (torch.float64, 1e-10),
         "surgery_triton": (torch.float32, 1e-4)}  # triton: the interpreter, fp32
ROUTED = [1, 3]


@pytest.fixture(params=list(PATHS))
def path(request) -> str:
    return request.param


def routed_model(path: str = "eager", seed: int = 0, bias: float = 0.0, **overrides) -> SurgeryForCausalLM:
    model = widened_surgery_model(path, seed, **{"modification_layers": ROUTED, **overrides})
    for layer in model.model.layers:  # routing mixed
        if layer.router is not None:
            layer.router.proj.bias.data.fill_(bias)
    return model.to(PATHS[path][0])


@torch.no_grad()
def reference(model, ids, first=None):
    """(logits, routed): routed[layer] (batch, n) bool for each routed layer, from the rule above."""
    model = model.double()
    config = model.config
    batch, n = ids.shape
    first = torch.zeros(batch, dtype=torch.long) if first is None else first
    hidden = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(n)[None])["full_attention"]
    group = config.num_attention_heads // config.num_key_value_heads
    routed = {}
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        goes = torch.arange(n)[None, :] >= first[:, None]  # real tokens
        if layer.router is not None:
            goes = goes & (torch.sigmoid(layer.router.proj(x).squeeze(-1)) >= config.modification_threshold)
            routed[index] = goes
        k = apply_rope(attention._heads(attention.k_proj(x)), cos, sin)
        v = attention._heads(attention.v_proj(x))
        q = apply_rope(attention._heads(attention.q_proj(x)), cos, sin)
        out = torch.zeros(batch, n, config.num_attention_heads, config.head_dim, dtype=torch.float64)
        for b in range(batch):
            for head in range(config.num_attention_heads):
                kv = head // group
                for t in range(n):
                    if not goes[b, t]:
                        continue
                    p = torch.arange(t + 1)[goes[b, : t + 1]]
                    scores = k[b, kv, p] @ q[b, head, t] * config.head_dim**-0.5
                    out[b, t, head] = scores.softmax(-1) @ v[b, kv, p]
        attended = hidden + attention.o_proj(out.reshape(batch, n, -1))
        updated = attended + layer.mlp(layer.post_attention_layernorm(attended))
        hidden = torch.where(goes[..., None] | (layer.router is None), updated, hidden)
    return model.lm_head(model.model.norm(hidden)), routed


def routed_share(routed: dict) -> float:
    return float(torch.stack([r.double().mean() for r in routed.values()]).mean())


def test_full_forward_follows_the_rule(path):
    model = routed_model(path)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    expected, routed = reference(model, ids)
    assert 0.2 < routed_share(routed) < 0.8  # the routers send some tokens through and let others skip
    assert not torch.equal(routed[1][0], routed[1][1])  # the two sequences route differently
    assert (model(ids, use_cache=False).logits - expected).abs().max() < PATHS[path][1]
    dense = routed_model(path, modification_layers=None)
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".router." not in k})
    assert (dense(ids).logits - expected).abs().max() > 1e-3  # skipping changes the model


def test_open_routers_compute_the_dense_model(path):
    """w·x + b with b large routes every token; the update is scaled by g / stopgrad(g) = 1, so nothing changes."""
    model = routed_model(path, bias=30.0)
    dense = routed_model(path, modification_layers=None)
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if ".router." not in k})
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    assert (model(ids).logits - dense(ids).logits).abs().max() < PATHS[path][1]


@pytest.mark.parametrize("batch", [1, 3])  # one sequence: slots stay contiguous, attended by slot index
def test_incremental_decoding_equals_the_full_forward(path, batch):
    model = routed_model(path)
    ids = torch.randint(0, 97, (batch, 16), generator=torch.Generator().manual_seed(3))
    stepwise, cache = decode_stepwise(model, ids, prompt=6)
    assert (stepwise - model(ids, use_cache=False).logits).abs().max() < PATHS[path][1]
    _, routed = reference(model, ids)
    for layer, goes in routed.items():  # the cache holds exactly the routed tokens of each sequence, in order
        router = model.model.layers[layer].router
        router.reset_counts()
        model(ids, use_cache=False)
        assert (router.seen_tokens, router.routed_tokens) == (ids.numel(), int(goes.sum()))
        assert router.computed_tokens == ids.shape[0] * int(goes.sum(-1).max())  # rows padded to the longest
        slots = cache.layers[layer]
        if slots.values is None:  # the layer routed no token of any sequence
            assert not goes.any()
            continue
        assert torch.equal(slots.valid[:, 0].sum(-1), goes.sum(-1))
        for b in range(ids.shape[0]):
            assert torch.equal(slots.positions[b, 0][slots.valid[b, 0]], goes[b].nonzero()[:, 0])


def test_left_padded_batches_route_each_sequence_by_the_rule(path):
    model = routed_model(path)
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    stepwise, cache = decode_stepwise(model, ids, prompt=6, mask=mask)
    expected, routed = reference(model, ids, first=torch.tensor([0, 3]))
    tolerance = PATHS[path][1]
    assert (stepwise[0] - expected[0]).abs().max() < tolerance
    assert (stepwise[1, 3:] - expected[1, 3:]).abs().max() < tolerance
    assert torch.equal(cache.layers[1].valid[:, 0].sum(-1), routed[1].sum(-1))  # padding never enters


def test_kv_bytes_and_counts_are_the_routed_tokens():
    """Measured from the cache's tensors: a routed layer holds K/V for its routed tokens only; the routers count
    exactly the tokens that entered their layer."""
    model = routed_model()
    n = 40
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(5))
    cache = model(ids, use_cache=True).past_key_values
    _, routed = reference(model, ids)
    config, element = model.config, 8  # float64
    per_token = 2 * config.num_key_value_heads * config.head_dim * element
    stored = (config.num_hidden_layers - len(ROUTED)) * n + sum(int(r.sum()) for r in routed.values())
    assert cache.kv_bytes() == stored * per_token
    for layer, goes in routed.items():
        router = model.model.layers[layer].router
        assert (router.seen_tokens, router.routed_tokens) == (n, int(goes.sum()))
    share = sum(int(r.sum()) for r in routed.values()) / (len(ROUTED) * n)
    expected = (config.num_hidden_layers - len(ROUTED) + len(ROUTED) * share) * n * per_token
    assert abs(cache.kv_bytes() - expected) <= 0.02 * expected


def test_a_step_that_routes_nothing_computes_nothing_in_that_layer():
    model = routed_model(bias=-30.0)  # every router closed: routed layers pass everything through
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(6))
    stepwise, cache = decode_stepwise(model, ids, prompt=4)
    assert (stepwise - reference(model, ids)[0]).abs().max() < 1e-10
    assert cache.layers[1].values is None and cache.get_seq_length() == 9
    assert all(model.model.layers[i].router.routed_tokens == 0 for i in ROUTED)


def test_training_scales_by_g_over_stopgrad_g():
    """Train mode computes the eval logits (the scale is exactly 1), and the routers get gradients through it; the
    regulariser inputs F (hard routed share) and G (mean g) are recorded."""
    model = routed_model()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        evaluated = model(ids, use_cache=False).logits
    model.train()
    trained = model(ids, use_cache=False).logits
    assert (trained - evaluated).abs().max() < 1e-12
    trained.square().mean().backward()
    router = model.model.layers[1].router
    assert router.proj.weight.grad.abs().sum() > 0
    _, routed = reference(model, ids)
    assert float(router.fraction.detach()) == pytest.approx(float(routed[1].double().mean()))
    assert 0 < float(router.mean.detach()) < 1


def test_routing_composes_with_projected_caches(path):
    ranks = [[4, 6], [8, 2], [5, 5], [3, 8]]
    model = routed_model(path, matryoshka_key_ranks=ranks, matryoshka_value_ranks=[r[::-1] for r in ranks])
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(8))
    stepwise, cache = decode_stepwise(model, ids, prompt=6)
    assert (stepwise - model(ids, use_cache=False).logits).abs().max() < PATHS[path][1]
    assert cache.layers[1].keys.shape[-1] == sum(ranks[1])


@pytest.mark.parametrize("bad, message", [
    ({"modification_layers": [3, 1]}, "modification_layers"),
    ({"modification_layers": [4]}, "modification_layers"),
    ({"modification_threshold": 1.0}, "modification_threshold"),
    ({"kv_source": [0, 1, 1, 3]}, "routed layer 1"),
    ({"kv_source": [0, 0, 2, 3]}, "routed layer 1"),
    ({"kv_policy": "snapkv", "kv_budget": 0.5}, "cannot be combined"),
    ({"attention_gate_heads": 1, "attention_gate_width": 4}, "cannot be combined"),
])
def test_bad_routing_plans_are_refused(bad, message):
    options = {**dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, modification_layers=ROUTED), **bad}
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        SurgeryConfig(**options).validate_architecture()


def test_batch_edits_of_the_cache_keep_each_sequences_routed_tokens():
    """Beam search and batch edits act on every tensor of a routed layer: after selecting rows, decoding goes on
    as a full forward of those sequences alone."""
    model = routed_model()
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(9))
    cache = model(ids[:, :11], use_cache=True).past_key_values
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.batch_repeat_interleave(2)  # rows 2, 2, 0, 0
    cache.reorder_cache(torch.tensor([2, 0]))  # rows 0, 2
    chosen = ids[[0, 2]]
    step = model(chosen[:, 11:], past_key_values=cache, use_cache=True).logits[:, -1]
    assert (step - model(chosen, use_cache=False).logits[:, -1]).abs().max() < 1e-10
