"""PoD in the decoder and the cache, against a plain float64 reference written from the paper's rule: query t of
layer L, KV head h, sees token p <= t with L's own key when p is proximal (one of the first `sinks` tokens or
p > t - recent) and with the key of h's bottom layer otherwise; one softmax; L's own values."""

import copy

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from helpers import decode_stepwise
from surgery.arch import SurgeryConfig, SurgeryForCausalLM
from surgery.arch.modeling_surgery import apply_rope
from surgery.evals.evaluate import cache_kv_bytes_per_token

SINKS, RECENT = 2, 4
# layer 0 keeps all; head 0 borrows from layer 0 in layers 1-2, head 1 starts a group at 1 (and borrows from 0 in
# layer 2, so layer 2 reads layer 0's tensor whole); layer 3 starts head 0's second group and borrows head 1 from 1;
# layer 4 borrows head 0 from 3 and keeps head 1; layer 5 borrows head 1 from 4
KEY_SOURCE = [[0, 0], [0, 1], [0, 0], [3, 1], [3, 4], [5, 4]]


PATHS = {"eager": (torch.float64, 1e-10), "sdpa": (torch.float64, 1e-10),  # sdpa: one call over both views
         "surgery_triton": (torch.float32, 1e-4)}  # triton: the interpreter, fp32


@pytest.fixture(params=list(PATHS))
def path(request) -> str:
    return request.param


def pod_model(key_source=KEY_SOURCE, seed: int = 0, path: str = "eager", **overrides) -> SurgeryForCausalLM:
    torch.manual_seed(seed)
    config = SurgeryConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=len(key_source),
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pod_key_source=key_source,
                           pod_sink_tokens=SINKS, pod_recent_tokens=RECENT, **overrides)
    config._attn_implementation = path
    model = SurgeryForCausalLM(config).double().eval()
    for parameter in model.parameters():  # random init is small; widen it so attention is far from uniform
        parameter.data.normal_(0, 0.3)
    return model.to(PATHS[path][0])


@torch.no_grad()
def reference_logits(model, ids, key_source=KEY_SOURCE, allowed=None, first=None, skip=None, counts=None):
    """The rule in the module docstring, one query, head and token at a time. `allowed(layer, kv_head, t)`
    optionally narrows the tokens a query sees (eviction); `first` (batch,) are the first real positions. With
    `skip` τ, a row of a layer with a borrowing head whose proximal mass is ≥ τ attends to its proximal tokens
    alone; `counts` then collects [rows, skipped rows, distant slots of the skipped rows]."""
    model = copy.deepcopy(model).double()
    config = model.config
    batch, n = ids.shape
    first = torch.zeros(batch, dtype=torch.long) if first is None else first
    positions = torch.arange(n)[None]  # RoPE by slot, as the model without position_ids; the rule by `first`
    hidden = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(hidden, positions)["full_attention"]
    keys_by_layer = []
    group = config.num_attention_heads // config.num_key_value_heads
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = apply_rope(attention._heads(attention.q_proj(x)), cos, sin)
        k = apply_rope(attention._heads(attention.k_proj(x)), cos, sin)
        v = attention._heads(attention.v_proj(x))
        keys_by_layer.append(k)
        out = torch.zeros(batch, n, config.num_attention_heads, config.head_dim, dtype=torch.float64)
        for b in range(batch):
            for head in range(config.num_attention_heads):
                kv = head // group
                bottom = keys_by_layer[key_source[index][kv]]
                for t in range(first[b], n):
                    p = torch.arange(first[b], t + 1)
                    proximal = (p - first[b] < SINKS) | (p > t - RECENT)
                    key = torch.where(proximal[:, None], k[b, kv, p], bottom[b, kv, p])
                    scores = key @ q[b, head, t] * config.head_dim**-0.5
                    if allowed is not None:
                        scores = scores.masked_fill(~allowed(index, b, kv, t)[p], float("-inf"))
                    probs = scores.softmax(-1)
                    if skip is not None and config.borrowed_heads(index) and not proximal.all():
                        skipped = bool(probs[proximal].sum() >= skip)
                        counts[0] += 1
                        counts[1] += skipped
                        counts[2] += int((~proximal).sum()) if skipped else 0
                        if skipped:
                            probs = scores.masked_fill(~proximal, float("-inf")).softmax(-1)
                    out[b, t, head] = probs @ v[b, kv, p]
        hidden = hidden + attention.o_proj(out.reshape(batch, n, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(model.model.norm(hidden))


def test_full_forward_follows_the_rule(path):
    model = pod_model(path=path)
    tolerance = PATHS[path][1]
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    logits = model(ids, use_cache=False).logits
    assert (logits - reference_logits(model, ids)).abs().max() < tolerance
    dense = pod_model(key_source=[[layer, layer] for layer in range(len(KEY_SOURCE))], path=path)
    assert (dense(ids).logits - logits).abs().max() > 1e-3  # borrowing keys changes the model


def test_distant_skip_follows_the_rule_and_counts_what_it_skips(path):
    """τ between the rows' proximal masses: some rows skip their distant tokens, others do not."""
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    model = pod_model(path=path, pod_distant_skip=0.6)
    counts = [0, 0, 0]
    expected = reference_logits(model, ids, skip=0.6, counts=counts)
    out = model(ids, use_cache=True)
    skip = out.past_key_values.view_skip
    assert 0 < counts[1] < counts[0]
    assert (out.logits - expected).abs().max() < PATHS[path][1]
    assert (skip.rows, skip.skipped) == (counts[0], counts[1])
    assert skip.skipped_flops == 2 * model.config.head_dim * counts[2]
    assert (out.logits - reference_logits(model, ids)).abs().max() > 1e-3  # skipping changes the model


def test_incremental_decoding_equals_the_full_forward_past_the_window(path):
    model = pod_model(path=path)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    stepwise, cache = decode_stepwise(model, ids, prompt=5)
    assert (stepwise - model(ids, use_cache=False).logits).abs().max() < PATHS[path][1]
    layer = cache.layers[1]  # a PoD layer: the borrowing head's own keys are gone for tokens outside the window
    assert layer.edge_keys.shape[2] == SINKS + RECENT


def test_left_padding_sinks_are_each_sequences_first_tokens(path):
    model = pod_model(path=path)
    tolerance = PATHS[path][1]
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    stepwise, _ = decode_stepwise(model, ids, prompt=6, mask=mask)
    expected = reference_logits(model, ids, first=torch.tensor([0, 3]))
    assert (stepwise[0] - expected[0]).abs().max() < tolerance
    assert (stepwise[1, 3:] - expected[1, 3:]).abs().max() < tolerance


def plan_bytes(config, tokens: int, batch: int) -> int:
    """What the plan says the cache holds: every value; all keys of heads that keep theirs, and sinks + recent
    keys of borrowing heads."""
    total = 0
    for layer, sources in enumerate(config.pod_key_source):
        for head, source in enumerate(sources):
            key_tokens = tokens if source == layer else SINKS + min(RECENT, tokens)
            total += (tokens + key_tokens) * config.head_dim * 8
    return total * batch


def test_kv_bytes_are_the_plans():
    model = pod_model()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(4))
    _, cache = decode_stepwise(model, ids, prompt=20)
    assert cache.kv_bytes() == plan_bytes(model.config, 24, 2)
    assert cache_kv_bytes_per_token(cache) == plan_bytes(model.config, 24, 2) / (2 * 24)  # what eval reports
    dense = pod_model(key_source=[[layer, layer] for layer in range(len(KEY_SOURCE))])
    _, dense_cache = decode_stepwise(dense, ids, prompt=20)
    assert cache.kv_bytes() < dense_cache.kv_bytes()


def assert_decodes_by_the_rule(model, cache, ids, prompt, tolerance):
    """Feed ids[prompt:] through a compressed cache: each step's logits are the rule's over the tokens the layer
    (for that head) still holds, plus the new ones."""
    logits = []
    for t in range(prompt, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    kept = {layer: [[owner.positions[b, kv][owner.valid[b, kv]] for kv in range(owner.valid.shape[1])]
                    for b in range(ids.shape[0])] for layer, owner in enumerate(cache.layers)}

    def allowed(layer, b, kv, t):
        seen = torch.zeros(ids.shape[1], dtype=torch.bool)
        seen[: t + 1] = True
        if t >= prompt:
            seen[:prompt] = False
            seen[kept[layer][b][kv][kept[layer][b][kv] < prompt]] = True
        return seen

    expected = reference_logits(model, ids, allowed=allowed)
    assert (torch.stack(logits, 1) - expected[:, prompt:]).abs().max() < tolerance


def assert_groups_keep_one_set(cache):
    for layer, sources in enumerate(KEY_SOURCE):
        for head, source in enumerate(sources):
            mine, theirs = cache.layers[layer], cache.layers[source]
            kept = mine.positions[0, head][mine.valid[0, head]]
            assert torch.equal(kept, theirs.positions[0, head][theirs.valid[0, head]]), (layer, head)


def test_eviction_keeps_one_set_per_group_and_decodes_by_the_rule(path):
    model = pod_model(kv_policy="snapkv", kv_window=3, path=path)
    ids = torch.randint(0, 97, (1, 19), generator=torch.Generator().manual_seed(5))
    cache = model(ids[:, :16], use_cache=True, kv_budget_tokens=9).past_key_values
    assert_groups_keep_one_set(cache)
    assert cache.layers[0].valid.sum(-1).tolist() == [[9, 9]]
    assert_decodes_by_the_rule(model, cache, ids, 16, PATHS[path][1])


def test_context_compression_with_a_probe_keeps_the_whole_recent_window(path):
    model = pod_model(kv_policy="snapkv", path=path)
    ids = torch.randint(0, 97, (1, 19), generator=torch.Generator().manual_seed(6))
    probe = torch.randint(0, 97, (1, 3), generator=torch.Generator().manual_seed(7))
    cache = model.compress_context(ids[:, :16], kv_budget_tokens=10, probe_ids=probe)
    assert cache.get_seq_length() == 16 and cache.layers[1].span >= RECENT
    assert_groups_keep_one_set(cache)
    assert_decodes_by_the_rule(model, cache, ids, 16, PATHS[path][1])


@pytest.mark.parametrize("bad, message", [
    ([[0, 0], [1, 2], [2, 2]], "pod_key_source\\[1\\]\\[1\\] = 2"),  # a later layer
    ([[0, 0], [0, 0], [1, 1]], "pod_key_source\\[2\\]\\[0\\] = 1"),  # a layer that borrows that head itself
    ([[0, 0], [1, 1]], "2 entries for 3 layers"),
    ([[0], [0], [0]], "one layer per KV head"),
])
def test_bad_key_sources_are_refused(bad, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        SurgeryConfig(num_hidden_layers=3, num_key_value_heads=2, num_attention_heads=2, hidden_size=16,
                      pod_key_source=bad)


@pytest.mark.parametrize("key_source, skip, message", [
    ([[0, 0], [0, 0], [0, 0]], 1.5, "pod_distant_skip must lie in \\(0, 1\\]"),
    (None, 0.7, "pod_distant_skip needs PoD's pod_key_source"),
])
def test_bad_distant_skips_are_refused(key_source, skip, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        SurgeryConfig(num_hidden_layers=3, num_key_value_heads=2, num_attention_heads=2, hidden_size=16,
                      pod_key_source=key_source, pod_distant_skip=skip)


def test_pod_refuses_kv_sharing():
    with pytest.raises(StrictDataclassClassValidationError, match="cannot be combined"):
        SurgeryConfig(num_hidden_layers=2, num_key_value_heads=1, num_attention_heads=2, hidden_size=16,
                      kv_source=[0, 0], pod_key_source=[[0], [0]])


@pytest.mark.parametrize("padded", [False, True])
def test_a_long_prefill_attends_block_by_block_to_what_each_block_reaches(padded, monkeypatch):
    """Past 2 blocks of queries, the two views are attended one query block at a time over the slots each block can
    reach (the distant view ends `recent` before the block, the proximal view is the sinks and the block's window):
    the same logits as the rule, and about half the (row, slot) pairs of attending every slot of both views."""
    import surgery.arch.attention_surgery as core

    model = pod_model(path="sdpa")
    ids = torch.randint(1, 97, (1 if not padded else 2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    pairs = []
    union = core.attend_union

    def counting(queries, views, *args):
        pairs.append(queries.states.shape[2] * sum(view.slots for view in views))
        return union(queries, views, *args)

    monkeypatch.setattr(core, "attend_union", counting)
    monkeypatch.setattr(core, "QUERY_BLOCK", 4)
    with torch.no_grad():
        tiled = model(ids, attention_mask=mask).logits
    tiled_pairs, pairs[:] = sum(pairs), []
    monkeypatch.setattr(core, "QUERY_BLOCK", 10**6)
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
    expected = reference_logits(model, ids, first=torch.tensor([0, 5][: ids.shape[0]]))
    for row, start in enumerate([0, 5][: ids.shape[0]]):
        assert (tiled[row, start:] - expected[row, start:]).abs().max() < 1e-10
        assert (tiled[row, start:] - whole[row, start:]).abs().max() < 1e-10
    assert tiled_pairs < 0.6 * sum(pairs)
