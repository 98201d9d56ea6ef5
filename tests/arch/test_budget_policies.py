"""KV budgets: exactness at budget 1, ragged decoding against an independent reference, the allocations."""

import math

import pytest
import torch

from factories import tiny_surgery_model

from helpers import decode_stepwise
from surgery.arch import SurgeryForCausalLM
from surgery.arch.budget_surgery import apportion, tokens_to_reach
from surgery.arch.policies_surgery import POLICIES, build_policy
from surgery.arch.matryoshka_surgery import set_kv_ranks
from surgery.arch.pyramid_surgery import PYRAMID_BETA
from surgery.arch.modeling_surgery import apply_rope
from surgery.evals.evaluate import kv_bytes_per_token


def tiny(policy, seed=0, layers=6, kv_source=None, window=4, **extra) -> SurgeryForCausalLM:
    return tiny_surgery_model(seed, layers, kv_policy=policy, kv_window=window, kv_source=kv_source, **extra)


def plain_lmba(mass: torch.Tensor) -> float:
    """ZigZagKV's LMBA written plainly: per head, the fewest tokens whose attention reaches 90% of the head's
    total, averaged over heads."""
    counts = []
    for row in mass.double().tolist():
        running, total = 0.0, sum(row)
        for count, value in enumerate(sorted(row, reverse=True), start=1):
            running += value
            if running >= 0.9 * total:
                counts.append(count)
                break
    return sum(counts) / len(counts)


def decode(model, ids, prompt, budget, mask=None):
    """Prefill `prompt` tokens with eviction at `budget`, then decode the rest one token at a time."""
    return decode_stepwise(model, ids, prompt, mask, kv_budget=budget)


@pytest.mark.parametrize("policy", POLICIES)
def test_budget_one_gives_full_cache_logits(policy):
    model = tiny(policy, seed=1)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        full_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    logits, cache = decode(model, ids, 30, budget=1.0)
    dense, _ = decode(model, ids, 30, budget=None)
    assert torch.equal(logits, dense)  # bit for bit what the full cache gives
    assert (logits - full).abs().max() < 1e-5
    assert all(layer.valid is None for layer in cache.layers)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, kv_budget=1.0, pad_token_id=0),
                           full_tokens)


source_inputs: dict = {}


def reference_decode(model, ids, prompt, kept):
    """Same as reference_logits, but records each layer's input so sharing layers read their source's K/V."""
    global source_inputs
    source_inputs = {}
    model = model.double()
    hidden = model.model.embed_tokens(ids[0]).double()
    for index, layer in enumerate(model.model.layers):
        source_inputs[index] = layer.input_layernorm(hidden)
        hidden = _plain_layer(model, index, hidden, prompt, kept)
    return model.lm_head(model.model.norm(hidden))


def _plain_layer(model, index, hidden, prompt, kept):
    config = model.config
    n = hidden.shape[0]
    cos, sin = model.model.rotary_emb(hidden[None], torch.arange(n)[None])["full_attention"]
    group = config.num_attention_heads // config.num_key_value_heads
    layer = model.model.layers[index]
    attention = layer.self_attn
    source = config.kv_source[index]
    owner = model.model.layers[source].self_attn
    projection = getattr(owner, "kv_projection", None)
    x, x_source = source_inputs[index], source_inputs[source]
    q = apply_rope(attention.q_proj(x).view(n, -1, 8).transpose(0, 1)[None], cos, sin)[0]
    k = apply_rope(owner.k_proj(x_source).view(n, -1, 8).transpose(0, 1)[None], cos, sin)[0]
    v = owner.v_proj(x_source).view(n, -1, 8).transpose(0, 1)
    heads = []
    for head in range(config.num_attention_heads):
        kv = head // group
        allowed = torch.tensor([[p <= t and (t < prompt or p >= prompt or p in kept[source][kv]) for p in range(n)]
                                for t in range(n)])
        if projection is None:
            scores = q[head] @ k[kv].T / math.sqrt(8)
            values = v[kv]
        else:  # MatryoshkaKV as the paper writes it, the softmax-invariant q·μ_K term included
            u_k, u_v = projection.key_bases[kv](), projection.value_bases[kv]()
            mu_k, mu_v = projection.key_mean[kv], projection.value_mean[kv]
            scores = ((q[head] @ u_k) @ ((k[kv] - mu_k) @ u_k).T + (q[head] @ mu_k)[:, None]) / math.sqrt(8)
            values = (v[kv] - mu_v) @ u_v @ u_v.T + mu_v
        heads.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values)
    hidden = hidden + attention.o_proj(torch.stack(heads, 1).reshape(n, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def kept_positions(cache, layers):
    kept = {}
    for layer in layers:
        slot = cache.layers[layer]
        kept[layer] = [set(slot.positions[0, h][slot.valid[0, h]].tolist()) for h in range(slot.valid.shape[1])]
    return kept


@pytest.mark.parametrize("policy,kv_source", [("snapkv", None), ("pyramid", None), ("zigzag", None),
                                              ("dynamickv", None), ("streamingllm", None), ("h2o", None),
                                              ("snapkv", [0, 1, 0, 3, 1, 3])])
def test_ragged_decoding_equals_masked_reference(policy, kv_source):
    model = tiny(policy, seed=2, kv_source=kv_source)
    ids = torch.randint(0, 97, (1, 44), generator=torch.Generator().manual_seed(3))
    prompt = 36
    logits, cache = decode(model, ids, prompt, budget=0.3)
    owners = sorted(set(model.config.kv_source))
    kept = kept_positions(cache, owners)
    assert all(len(heads[0]) < prompt for heads in kept.values())  # tokens really were evicted
    expected = reference_decode(model, ids, prompt, kept)
    assert (logits[0, prompt - 1 :].double() - expected[prompt - 1 :]).abs().max() < 1e-5


def snapkv_reference_selection(model, ids, layer, window, budget_tokens):
    """SnapKV written out: softmax rows of the window queries, summed, avg-pooled (k=7), averaged per KV head."""
    n = ids.shape[1]
    with torch.no_grad():
        hidden = model.model(ids, use_cache=False, output_hidden_states=True).hidden_states[layer][0].double()
        attention = model.model.layers[layer].self_attn
        x = model.model.layers[layer].input_layernorm(hidden.float()).double()
        cos, sin = model.model.rotary_emb(hidden[None], torch.arange(n)[None])["full_attention"]
        q = apply_rope(attention.q_proj(x.float()).double().view(n, -1, 8).transpose(0, 1)[None], cos.double(), sin.double())[0]
        k = apply_rope(attention.k_proj(x.float()).double().view(n, -1, 8).transpose(0, 1)[None], cos.double(), sin.double())[0]
    selections = []
    for kv in range(2):
        total = torch.zeros(n - window, dtype=torch.float64)
        for head in range(kv * 3, kv * 3 + 3):
            summed = torch.zeros(n, dtype=torch.float64)
            for t in range(n - window, n):
                row = (q[head, t] @ k[kv, : t + 1].T / math.sqrt(8)).softmax(-1)
                summed[: t + 1] += row
            prefix = summed[: n - window]
            padded = torch.cat([torch.zeros(3, dtype=torch.float64), prefix, torch.zeros(3, dtype=torch.float64)])
            pooled = torch.stack([padded[i : i + 7].sum() / 7 for i in range(n - window)])
            total += pooled / 3
        top = set(total.topk(budget_tokens - window).indices.tolist())
        selections.append(top | set(range(n - window, n)))
    return selections


def test_snapkv_keeps_what_the_paper_scores_highest():
    model = tiny("snapkv", seed=4, window=5)
    ids = torch.randint(0, 97, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model(ids, kv_budget_tokens=15).past_key_values
    kept = kept_positions(cache, range(6))
    for layer in (0, 3, 5):
        assert kept[layer] == snapkv_reference_selection(model, ids, layer, window=5, budget_tokens=15)


@pytest.mark.parametrize("policy", POLICIES)
def test_layer_budgets_sum_to_the_total_and_bytes_match(policy):
    model = tiny(policy, seed=5, layers=8)
    ids = torch.randint(0, 97, (1, 120))
    state = build_policy(policy, 0.2, None, model.config.owner_layers, torch.tensor([120]), model.config.kv_window)
    with torch.no_grad():
        cache = model(ids, kv_policy=state).past_key_values
    counts = [int(layer.valid[0, 0].sum()) for layer in cache.layers]
    assert sum(counts) == round(0.2 * 120) * 8
    full_bytes = 2 * 2 * 8 * 4 * 8  # K and V, 2 KV heads, head_dim 8, float32, 8 layers
    assert kv_bytes_per_token(model, ids, kv_budget=0.2) == pytest.approx(0.2 * full_bytes, rel=0.02)
    if policy == "pyramid":
        base, window = 24, 4
        low = (base - window) / PYRAMID_BETA
        high = 2 * (base - window) - low
        expected = [high - i * (high - low) / 7 + window for i in range(8)]
        assert max(abs(c - e) for c, e in zip(counts, expected)) <= 1
        assert counts == sorted(counts, reverse=True)
    if policy == "zigzag":
        lmba = torch.tensor([plain_lmba(state.scores[layer].mass[0]) for layer in range(8)], dtype=torch.float64)
        assert [float(state.lmba(layer)[0]) for layer in range(8)] == pytest.approx(lmba.tolist())
        expected = 0.2 * 24 + (24 - 0.2 * 24) * 8 * lmba / lmba.sum()
        assert max(abs(c - e) for c, e in zip(counts, expected.tolist())) <= 1


def test_batch_with_padding_decodes_like_each_sequence_alone():
    model = tiny("zigzag", seed=6)
    generator = torch.Generator().manual_seed(7)
    long, short = torch.randint(3, 97, (1, 48), generator=generator), torch.randint(3, 97, (1, 36), generator=generator)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 12, dtype=torch.long), short], 1)])
    mask = (torch.arange(48)[None] >= torch.tensor([[0], [12]])).long()
    kwargs = dict(max_new_tokens=8, do_sample=False, kv_budget=0.25, pad_token_id=0)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kwargs)[:, 48:]
        alone = [model.generate(seq, **kwargs)[:, seq.shape[1]:] for seq in (long, short)]
    assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])


def random_bases(model, seed: int) -> None:
    """Random orthonormal bases and means, so projection errors are visible (identity bases would hide them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            projection = getattr(layer.self_attn, "kv_projection", None)
            if projection is None:
                continue
            for basis in (*projection.key_bases, *projection.value_bases):
                basis.weight.copy_(torch.linalg.qr(torch.randn(8, basis.weight.shape[1], generator=generator))[0])
            projection.key_mean.copy_(torch.randn(projection.key_mean.shape, generator=generator) * 0.1)
            projection.value_mean.copy_(torch.randn(projection.value_mean.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("kv_source", [None, [0, 1, 0, 3, 1, 3]])
def test_matryoshka_projected_cache_is_evicted_per_head(kv_source):
    model = tiny("snapkv", seed=8, kv_source=kv_source)
    set_kv_ranks(model, [[3, 5]] * 6, [[4, 2]] * 6)
    random_bases(model, seed=9)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    logits, cache = decode(model, ids, 32, budget=0.25)
    # 8 prompt tokens kept (25% of 32) plus 8 decoded, packed at Σ ranks: 3 + 5 for keys, 4 + 2 for values
    assert tuple(cache.layers[1].keys.shape) == (1, 1, 16, 8) and tuple(cache.layers[1].values.shape) == (1, 1, 16, 6)
    owners = sorted(set(model.config.kv_source))
    kept = kept_positions(cache, owners)
    assert all(len(heads[0]) < 32 for heads in kept.values())
    expected = reference_decode(model, ids, 32, kept)
    assert (logits[0, 31:].double() - expected[31:]).abs().max() < 1e-5


@pytest.mark.parametrize("projected", [False, True])
def test_kvsharer_decoding_equals_plain_float64_attention_over_the_source_kv(projected):
    """Without eviction: every layer attends to its source layer's K/V, computed plainly in float64."""
    model = tiny(None, seed=11, kv_source=[0, 1, 0, 3, 1, 3])
    if projected:
        set_kv_ranks(model, [[5, 6], [7, 4], None, [3, 8], None, None], [[6, 5], [2, 8], None, [8, 3], None, None])
        random_bases(model, seed=12)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(5))
    logits, cache = decode(model, ids, 20, budget=None)
    assert [layer.keys is None for layer in cache.layers] == [False, False, True, False, True, True]
    expected = reference_decode(model, ids, 30, kept=None)
    assert (logits[0].double() - expected).abs().max() < 1e-5


def test_apportion_and_lmba_helpers():
    assert apportion(torch.tensor([1.0, 1.0, 2.0]), 12, 1, 100) == [3, 3, 6]
    assert sum(apportion(torch.tensor([5.0, 0.1, 0.1]), 30, 2, 12)) == 30
    assert max(apportion(torch.tensor([5.0, 0.1, 0.1]), 30, 2, 12)) == 12
    mass = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert tokens_to_reach(mass, 0.9).tolist() == [3]


def test_context_only_cache_continues_in_generate():
    """compress_context at the full budget then generate == plain generate; under budget the cache is compact."""
    model = tiny("snapkv", seed=9, window=4)
    context, question = torch.randint(3, 97, (1, 40)), torch.randint(3, 97, (1, 5))
    full = torch.cat([context, question], 1)
    kwargs = dict(attention_mask=torch.ones_like(full), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(full, **kwargs)
        kept_all = model.compress_context(context, kv_budget_tokens=40)
        assert torch.equal(model.generate(full, past_key_values=kept_all, **kwargs), plain)
        cache = model.compress_context(context, kv_budget=0.25)
        assert cache.get_seq_length() == 40 and all(int(layer.valid.sum()) == 2 * 10 for layer in cache.layers)
        out = model.generate(full, past_key_values=cache, **kwargs)
    assert out.shape == plain.shape and cache.get_seq_length() == 40 + 5 + 5


def test_probe_scores_the_context_and_leaves():
    model = tiny("snapkv", seed=10, window=4)
    generator = torch.Generator().manual_seed(10)
    context, probe = torch.randint(3, 97, (1, 40), generator=generator), torch.randint(3, 97, (1, 6), generator=generator)
    with torch.no_grad():
        cache = model.compress_context(context, kv_budget=0.25, probe_ids=probe)
        unprobed = model.compress_context(context, kv_budget=0.25)
    for layer in cache.layers:
        assert int(layer.valid.sum()) == 2 * 10  # 10 context tokens per KV head
        assert int(layer.positions[layer.valid].max()) < 40  # no probe token stays
    assert cache.get_seq_length() == 40
    kept = kept_positions(cache, range(6))
    assert kept != kept_positions(unprobed, range(6))  # the probe changed what was kept
    for layer in (0, 2, 5):  # the probe's queries are the observation window, as SnapKV written out says
        reference = snapkv_reference_selection(model, torch.cat([context, probe], 1), layer, window=6, budget_tokens=16)
        assert kept[layer] == [{p for p in heads if p < 40} for heads in reference]


def test_passkey_prompt_and_answer(tiny_with_tokenizer):
    from surgery.calibrate.text import heldout_text
    from surgery.checkpoint.loading import load_tokenizer
    from surgery.evals.passkey import answer_is_right, passkey_prompts

    tokenizer = load_tokenizer(tiny_with_tokenizer)
    prompts = passkey_prompts(tokenizer, heldout_text(), [300], per_depth=2, seed=1)
    assert len(prompts) == 6 and len({p.key for p in prompts}) == 6
    for prompt in prompts:
        total = prompt.context.shape[1] + prompt.question.shape[1]
        assert abs(total - 300) <= 2
        text = tokenizer.decode(prompt.context[0])
        assert f"The pass key is {prompt.key}" in text
        where = text.index(prompt.key) / len(text)
        assert abs(where - prompt.depth) < 0.1
    ids = tokenizer(f" {prompts[0].key}. Remember", return_tensors="pt")["input_ids"]
    assert answer_is_right(tokenizer, ids, prompts[0].key)
    assert not answer_is_right(tokenizer, tokenizer(" 11111", return_tensors="pt")["input_ids"], prompts[0].key)


def test_convert_kvsharer_plus_calibrated_zigzag(tiny_llama, tmp_path):
    from helpers import load_remote, run_convert

    out = run_convert(tiny_llama, tmp_path / "both", recipe="kvsharer,zigzag", share_layers=2, threshold=-1.0,
                      num_samples=4, seq_len=40, verify=True, recipe_options={"keep": 0.2, "calibrated": True, "keep_at_least": 0})
    model = load_remote(out)
    assert model.config.kv_policy == "zigzag" and model.config.kv_budget == 0.2
    owners = [i for i, s in enumerate(model.config.kv_source) if s == i]
    weights = model.config.kv_layer_weights
    assert len(owners) == 4 and sum(weights[i] for i in owners) == pytest.approx(1, abs=1e-4)
    assert all(weights[i] == 0 for i in range(6) if i not in owners)
    ids = torch.randint(3, 128, (1, 100))
    with torch.no_grad():
        cache = model(ids).past_key_values  # the config's default budget applies
        counts = [None if layer.keys is None else int(layer.valid[0, 0].sum()) for layer in cache.layers]
        assert sum(c for c in counts if c) == 20 * 4 and [c is None for c in counts] == [i not in owners for i in range(6)]
        wider = model(ids, kv_budget=0.5).past_key_values  # a per-call override
        assert sum(int(layer.valid[0, 0].sum()) for layer in wider.layers if layer.keys is not None) == 50 * 4
    assert "policy zigzag" in (out / "README.md").read_text()


def test_eval_passkey_task_runs_from_the_cli(tiny_with_tokenizer, tmp_path):
    import json

    from click.testing import CliRunner

    from helpers import run_convert
    from surgery.cli.main import main

    out = run_convert(tiny_with_tokenizer, tmp_path / "snap", recipe="snapkv", recipe_options={"keep": 0.3})
    result = CliRunner().invoke(main, ["-q", "eval", str(out), "--task", "passkey", "--lengths", "160",
                                       "--per-depth", "1", "--json", str(tmp_path / "pk.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "pk.json").read_text())["passkey"]
    assert set(report["results"]) == {"query-aware", "context-only", "full cache"}
    assert report["results"]["query-aware"]["160"].endswith("/3")
    assert report["setting"]["keep"] == "30% of each prompt"
    assert report["continuation_perplexity"]["model"] > 1 and report["continuation_perplexity"]["full cache"] > 1


def plain_dynamickv(pooled: dict[int, torch.Tensor], n: int, base: int, window: int):
    """DynamicKV's allocation re-computed with plain loops from each layer's original pooled scores: cap every
    layer at 10·B as it runs; every 4 layers a global top-k over the layers seen (max over heads of what each head
    still keeps), rescaled to B·L; at the end the same top-k over all layers with B·L in all.

    Returns the tokens each seen layer's first head holds after each layer has run, and the final counts."""
    layers = sorted(pooled)
    prefix = pooled[layers[0]].shape[-1]
    alive = {layer: [set(range(prefix)) for _ in range(pooled[layer].shape[0])] for layer in layers}

    def keep(layer, count):
        for head, kept in enumerate(alive[layer]):
            ranked = sorted(kept, key=lambda p: -float(pooled[layer][head, p]))
            alive[layer][head] = set(ranked[: max(count - window, 0)])

    def top_k(seen, total):
        entries = [(max(float(pooled[layer][h, p]) for h in range(pooled[layer].shape[0]) if p in alive[layer][h]), i)
                   for i, layer in enumerate(seen) for p in range(prefix)
                   if any(p in heads for heads in alive[layer])]
        k = max(0, min(total - window * len(seen), len(entries)))
        chosen = [0] * len(seen)
        for _, i in sorted(entries, reverse=True)[:k]:
            chosen[i] += 1
        return [window + c for c in chosen]

    history = []
    for done, layer in enumerate(layers, start=1):
        keep(layer, min(n, 10 * base))
        if done % 4 == 0 and done < len(layers):
            seen = layers[:done]
            for owner, count in zip(seen, top_k(seen, base * done)):
                keep(owner, min(n, round(count * len(layers) / done)))
        history.append({seen: len(alive[seen][0]) + window for seen in layers[:done]})
    return history, top_k(layers, base * len(layers))


def test_dynamickv_allocation_equals_a_plain_recomputation():
    from surgery.arch.dynamickv_surgery import DynamicKV

    class Recording(DynamicKV):
        original, history = {}, []

        def score_layer(self, layer, query, key, padding, scaling, cache, lse=None, softcap=None):
            self.scores[layer] = self.scorer(query, key, padding, scaling, lse, softcap)
            self.original[layer] = self.scores[layer].pooled[0].clone()
            self.observe(layer, cache)
            self.history.append({seen: int(cache.layers[seen].valid[0, 0].sum()) for seen in self.original})

    model = tiny("dynamickv", seed=13, layers=8, window=4)
    ids = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(13))
    policy = Recording(0.05, None, list(range(8)), torch.tensor([120]), 4)  # B = 6, so the 10·B cap (60) bites
    with torch.no_grad():
        cache = model(ids, kv_policy=policy).past_key_values
    history, final = plain_dynamickv(policy.original, 120, 6, 4)
    assert policy.history == history
    assert history[0] == {0: 60} and min(history[3].values()) < 60  # the cap, then the cut after 4 layers
    counts = [int(layer.valid[0, 0].sum()) for layer in cache.layers]
    assert counts == final and sum(counts) == 6 * 8


def test_calibrated_zigzag_shares_layer_by_layer_equal_the_whole_model(tmp_path):
    """u_l from the layer runner (one batch of prompts per policy) equals u_l from whole-model prefills, one
    prompt at a time, averaged over prompts as the paper's calibration does."""
    from surgery.calibrate.source_model import load_calibration_model
    from surgery.checkpoint.families import surgery_config_from_source
    from surgery.calibrate.layer_runner import LayerRunner
    from surgery.recipes.zigzag import ZigZagKV
    from surgery.checkpoint.sources import resolve

    from conftest import save_tiny

    peaky = save_tiny(tmp_path / "peaky", "llama", seed=3, num_hidden_layers=6, initializer_range=0.3)  # sharp attention
    source = resolve(str(peaky))
    config = surgery_config_from_source(source.config)
    ids = torch.randint(3, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    shares = ZigZagKV.layer_shares(LayerRunner(source.folder, config, ids, batch_size=2))
    model = load_calibration_model(source, config)
    expected = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for sample in ids.split(1):
            policy = build_policy("zigzag", 0.5, None, list(range(6)), torch.tensor([40]), None)
            model(sample, use_cache=True, kv_policy=policy)
            lmba = torch.stack([policy.lmba(layer)[0] for layer in range(6)]).double()
            expected += lmba / lmba.sum() / 3
    assert shares == pytest.approx(expected.tolist(), abs=2e-6)
    assert len(set(shares)) > 1  # layers differ, so the test can tell them apart
