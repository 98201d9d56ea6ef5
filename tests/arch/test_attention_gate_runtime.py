"""Attention-Gate in the decoder and the cache, against a plain float64 reference written from the rule: layer L's
gate (causal attention over L's input plus the token's own gate value, then σ) flags token p for KV head h; query t then sees token p <= t when
p == t or the flag of (p, h) in the layer whose cache L reads says keep. One softmax over what it sees."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from helpers import decode_stepwise, widened_surgery_model
from surgery.arch import SurgeryConfig, SurgeryForCausalLM
from surgery.arch.attention_surgery import weighted_softmax
from surgery.arch.modeling_surgery import apply_rope

PATHS = {"eager": (torch.float64, 1e-10), "sdpa": (torch.float64, 1e-10),
         "surgery_triton": (torch.float32, 1e-4)}  # triton: the interpreter, fp32
LAYERS = 4


@pytest.fixture(params=list(PATHS))
def path(request) -> str:
    return request.param


def gated_model(path: str = "eager", seed: int = 0, **overrides) -> SurgeryForCausalLM:
    model = widened_surgery_model(path, seed, **{"num_hidden_layers": LAYERS, "attention_gate_heads": 1, "attention_gate_width": 4,
                                                 **overrides})
    for layer in model.model.layers:  # flags mixed
        if getattr(layer.self_attn, "gate", None) is not None:
            layer.self_attn.gate.out.bias.data.fill_(0.1)
    return model.to(PATHS[path][0])


@torch.no_grad()
def reference(model, ids, first=None):
    """(logits, flags): flags[layer] (batch, kv_heads, n) bool for each K/V-owning layer, from the rule above."""
    model = model.double()
    config = model.config
    batch, n = ids.shape
    first = torch.zeros(batch, dtype=torch.long) if first is None else first
    hidden = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(n)[None])["full_attention"]
    group = config.num_attention_heads // config.num_key_value_heads
    stored, flags = {}, {}
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        if attention.owns_kv:
            gate = attention.gate
            gq, gk, gv = (projection(x).view(batch, n, gate.heads, gate.width).transpose(1, 2)
                          for projection in (gate.query, gate.key, gate.value))
            scores = gq @ gk.transpose(2, 3) * gate.width**-0.5
            seen = (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None, None]
            seen = seen & (torch.arange(n)[None, None, None, :] >= first[:, None, None, None])
            mixed = scores.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0) @ gv + gv  # + own value
            logits = gate.out(mixed.transpose(1, 2).reshape(batch, n, -1)).transpose(1, 2)
            flags[index] = torch.sigmoid(logits) >= gate.threshold
            k = apply_rope(attention._heads(attention.k_proj(x)), cos, sin)
            stored[index] = (k, attention._heads(attention.v_proj(x)))
        source = attention.kv_source
        k, v = stored[source]
        q = apply_rope(attention._heads(attention.q_proj(x)), cos, sin)
        out = torch.zeros(batch, n, config.num_attention_heads, config.head_dim, dtype=torch.float64)
        for b in range(batch):
            for head in range(config.num_attention_heads):
                kv = head // group
                for t in range(first[b], n):
                    p = torch.arange(first[b], t + 1)
                    sees = (p == t) | flags[source][b, kv, p]
                    scores = (k[b, kv, p] @ q[b, head, t] * config.head_dim**-0.5).masked_fill(~sees, float("-inf"))
                    out[b, t, head] = scores.softmax(-1) @ v[b, kv, p]
        hidden = hidden + attention.o_proj(out.reshape(batch, n, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(model.model.norm(hidden)), flags


def kept_fraction(flags: dict) -> float:
    return float(torch.stack([f.double().mean() for f in flags.values()]).mean())


def test_full_forward_follows_the_rule(path):
    model = gated_model(path)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    expected, flags = reference(model, ids)
    assert 0.2 < kept_fraction(flags) < 0.8  # the gates evict some tokens and keep others
    assert (model(ids, use_cache=False).logits - expected).abs().max() < PATHS[path][1]
    ungated = gated_model(path, attention_gate_heads=None)
    assert (ungated(ids).logits - expected).abs().max() > 1e-3  # eviction changes the model


def test_incremental_decoding_equals_the_full_forward(path):
    model = gated_model(path)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    stepwise, cache = decode_stepwise(model, ids, prompt=6)
    assert (stepwise - model(ids, use_cache=False).logits).abs().max() < PATHS[path][1]
    _, flags = reference(model, ids)
    for layer, layer_flags in flags.items():  # the cache holds exactly the kept tokens, per sequence and head
        assert torch.equal(cache.layers[layer].kept_slots(), layer_flags.sum(-1))


def test_left_padded_batches_decode_each_sequence_by_the_rule(path):
    model = gated_model(path)
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    stepwise, cache = decode_stepwise(model, ids, prompt=6, mask=mask)
    expected, flags = reference(model, ids, first=torch.tensor([0, 3]))
    tolerance = PATHS[path][1]
    assert (stepwise[0] - expected[0]).abs().max() < tolerance
    assert (stepwise[1, 3:] - expected[1, 3:]).abs().max() < tolerance
    padded = flags[0].clone()
    padded[1, :, :3] = False  # padding never enters the cache
    assert torch.equal(cache.layers[0].kept_slots(), padded.sum(-1))


def test_kv_bytes_are_the_kept_tokens_plus_the_gate_state():
    """Measured from the cache's tensors: per head exactly its kept tokens (no head padded to another's count),
    plus the gate's keys and values for every token."""
    model = gated_model()
    n = 40
    ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(4))
    cache = model(ids, use_cache=True).past_key_values
    _, flags = reference(model, ids)
    config, element = model.config, 8  # float64
    kept = sum(int(f.sum()) for f in flags.values())
    heads = torch.stack([f.sum(-1) for f in flags.values()])
    assert heads.min() != heads.max()  # heads keep different counts
    gate_state = LAYERS * 2 * config.attention_gate_heads * config.attention_gate_width * n * element
    assert cache.kv_bytes() == kept * 2 * config.head_dim * element + gate_state
    full = LAYERS * config.num_key_value_heads * 2 * config.head_dim * n * element
    keep = kept / (LAYERS * config.num_key_value_heads * n)
    assert abs(cache.kv_bytes() - (keep * full + gate_state)) <= 0.02 * cache.kv_bytes()


def test_sharing_layers_read_their_sources_kept_tokens(path):
    model = gated_model(path, kv_source=[0, 0, 2, 2])
    assert not hasattr(model.model.layers[1].self_attn, "gate") or model.model.layers[1].self_attn.gate is None
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    expected, _ = reference(model, ids)
    stepwise, cache = decode_stepwise(model, ids, prompt=5)
    assert (stepwise - expected).abs().max() < PATHS[path][1]
    assert cache.layers[1].stored_tensors() == ()


def test_projected_caches_are_gated_per_head(path):
    ranks = [[4, 6], [8, 2], [5, 5], [3, 8]]
    model = gated_model(path, matryoshka_key_ranks=ranks, matryoshka_value_ranks=[r[::-1] for r in ranks])
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(6))
    stepwise, cache = decode_stepwise(model, ids, prompt=6)
    assert (stepwise - model(ids, use_cache=False).logits).abs().max() < PATHS[path][1]
    layer = cache.layers[1]
    assert [head.keys.shape[-1] for head in layer.heads] == ranks[1]


def test_training_flags_are_hard_forward_and_soft_backward():
    """Train mode computes the same logits as eval mode (the flags are exactly 0 or 1), and the gates get gradients."""
    model = gated_model()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(7))
    flags = []
    hook = model.model.layers[0].self_attn.gate.register_forward_hook(lambda module, args, out: flags.append(out.keep))
    with torch.no_grad():
        evaluated = model(ids, use_cache=False).logits
    hook.remove()
    model.train()
    trained = model(ids, use_cache=False).logits
    assert torch.equal(trained, evaluated)
    trained.square().mean().backward()
    gate = model.model.layers[0].self_attn.gate
    assert gate.out.weight.grad.abs().sum() > 0 and gate.query.weight.grad.abs().sum() > 0
    assert torch.allclose(gate.rate.double(), flags[0].double().mean((0, 2)))  # the hard flags' rate per KV head, as in eval


def test_training_noise_samples_each_flag_with_its_keep_probability():
    """With logistic noise of scale 1 and τ = 0.5, token p is kept with probability σ(logit_p): over many seeds the
    kept share of each (token, head) matches σ, and one seed always draws the same flags (gradient checkpointing
    runs the forward twice)."""
    from surgery.arch.attention_gate_surgery import GatedKVLayer

    model = gated_model()
    model.model.layers[0].self_attn.gate.out.bias.data.fill_(0.0)
    gate = model.model.layers[0].self_attn.gate
    hidden = torch.randn(1, 10, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    positions = torch.arange(10)[None]

    def flags(seed: int | None) -> torch.Tensor:
        gate.noise, gate.noise_seed = 1.0, seed
        return gate(hidden, GatedKVLayer(model.config.num_key_value_heads), positions, None)

    gate.train()
    probability = flags(None).probability
    kept = torch.stack([flags(seed).keep for seed in range(2000)]).double().mean(0)
    assert (kept - probability).abs().max() < 0.05  # 2000 Bernoulli draws: 4.5 standard deviations at p = 0.5
    assert torch.equal(flags(3).keep, flags(3).keep) and not torch.equal(flags(3).keep, flags(4).keep)
    gate.eval()
    assert torch.equal(flags(3).keep, probability >= 0.5)  # evaluation ignores the noise


def test_a_zero_weight_slot_still_gets_a_gradient():
    """p_j = w_j·e^{s_j} / Σ w_k·e^{s_k}: with w_j = 0 the forward is the masked softmax, and ∂(c·p)/∂w_j equals
    the derivative computed by finite differences in float64."""
    scores = torch.randn(1, 1, 1, 5, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    probs, lse = weighted_softmax(scores, weights)
    masked = scores.masked_fill(weights.detach() == 0, float("-inf"))
    assert torch.allclose(probs, masked.softmax(-1)) and torch.allclose(lse, masked.logsumexp(-1))
    values = torch.arange(5.0, dtype=torch.float64)
    (probs[0, 0, 0] @ values).backward()
    eps = 1e-7

    def objective(w):
        return (w * scores.exp()[0, 0, 0] / (w * scores.exp()[0, 0, 0]).sum()) @ values

    bumped = weights.detach().clone()
    bumped[1] += eps
    assert weights.grad[1] != 0
    assert abs(float(weights.grad[1]) - float((objective(bumped) - objective(weights.detach())) / eps)) < 1e-5


@pytest.mark.parametrize("bad, message", [
    ({"attention_gate_width": None}, "attention_gate_width"),
    ({"attention_gate_threshold": 1.0}, "attention_gate_threshold"),
    ({"kv_policy": "snapkv", "kv_budget": 0.5}, "cannot be combined"),
])
def test_bad_gate_configs_are_refused(bad, message):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        gated_model(**bad)


def test_budget_policies_cannot_run_on_a_gated_cache():
    model = gated_model()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(8))
    with pytest.raises(RuntimeError, match="Attention-Gate"):
        model.compress_context(ids, kv_budget=0.5)
