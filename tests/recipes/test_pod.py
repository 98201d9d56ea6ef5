"""The PoD recipe: the similarity and the grouping against plain formulas, conversion, composition, bad input."""

import math
import shutil

import pytest
import torch
import yaml

from helpers import assert_clean_failure, cli, load_reference, load_remote, run_convert
from surgery.recipes.pod import GreedyGrouping, distant_attention, js_similarity


def plain_js_similarity(p: list[float], q: list[float]) -> float:
    """1 − JSD in bits of two distributions, term by term."""
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl_p = sum(a * math.log2(a / c) for a, c in zip(p, m) if a > 0)
    kl_q = sum(b * math.log2(b / c) for b, c in zip(q, m) if b > 0)
    return 1 - (kl_p + kl_q) / 2


def test_similarity_is_one_minus_jensen_shannon_in_bits():
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(3, 2, 4, 6, generator=generator, dtype=torch.float64)
    q = torch.rand(3, 2, 4, 6, generator=generator, dtype=torch.float64)
    p[..., 0] = 0  # a causal mask leaves zeros
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    got = js_similarity(p, q)
    for head in range(2):
        rows = [plain_js_similarity(p[s, head, r].tolist(), q[s, head, r].tolist()) for s in range(3) for r in range(4)]
        assert got[head].item() == pytest.approx(sum(rows) / len(rows), abs=1e-12)
    assert js_similarity(p, p).tolist() == pytest.approx([1.0, 1.0])
    disjoint = torch.tensor([1.0, 0.0])[None, None, None], torch.tensor([0.0, 1.0])[None, None, None]
    assert js_similarity(*disjoint).item() == pytest.approx(0.0)


def test_groups_grow_from_the_bottom_while_similar_to_its_bottom_layer():
    one_hot = torch.eye(4, dtype=torch.float64)
    near = torch.tensor([0.9, 0.1, 0.0, 0.0], dtype=torch.float64)
    # head 0: layers 0-2 alike, layer 3 not; head 1: every layer unlike the one before
    head0 = [one_hot[0], one_hot[0], near, one_hot[3]]
    head1 = [one_hot[0], one_hot[1], one_hot[2], one_hot[3]]
    grouping = GreedyGrouping(delta=0.5)
    for layer in range(4):
        grouping.add(layer, torch.stack([head0[layer], head1[layer]])[None, :, None, :])
    assert grouping.key_source == [[0, 0], [0, 1], [0, 2], [3, 3]]
    assert grouping.similarity[2][0] == pytest.approx(plain_js_similarity(near.tolist(), one_hot[0].tolist()), abs=1e-6)


def test_distant_attention_is_the_shared_keys_renormalised():
    """Key j is distant for the query at t when sinks <= j <= t − recent: those are the keys PoD shares."""
    probs = torch.rand(1, 1, 3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = distant_attention(probs, sinks=2, recent=3)
    for row, t in enumerate(range(7, 10)):
        part = [probs[0, 0, row, j].item() if 2 <= j <= t - 3 else 0.0 for j in range(10)]
        assert got[0, 0, row].tolist() == pytest.approx([x / sum(part) for x in part], abs=1e-12)


def plain_attention(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, (samples, kv_heads, last 64 queries, keys) float64 attention of transformers' own eager model,
    averaged over each KV head's query heads: the reference the recipe's attention is checked against."""
    model = model.double()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    kv, n = model.config.num_key_value_heads, ids.shape[1]
    return [a.view(a.shape[0], kv, -1, n, n).mean(2)[:, :, n - 64 :] for a in attentions]


def plain_similarity(p: torch.Tensor, q: torch.Tensor, head: int) -> float:
    rows = [plain_js_similarity(p[s, head, r].tolist(), q[s, head, r].tolist())
            for s in range(p.shape[0]) for r in range(p.shape[2]) if p[s, head, r].sum() > 0 and q[s, head, r].sum() > 0]
    return sum(rows) / len(rows) if rows else 0.0  # nothing to compare (a sliding layer's distant part): not alike


def local_layer_model(tiny_models, folder):
    """A tiny Qwen2 (q/k biases; layers 2-3 slide over a window of 6) whose layer 1 has constant queries and keys:
    its attention depends on distance alone through RoPE, peaked on the nearest tokens, so its proximal and distant
    attention tell different stories."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_models["qwen2"], folder)
    weights = load_file(folder / "model.safetensors")
    for projection in ("q_proj", "k_proj"):
        weights[f"model.layers.1.self_attn.{projection}.weight"].zero_()
        weights[f"model.layers.1.self_attn.{projection}.bias"].fill_(1.0)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_grouping_on_distant_attention_differs_from_whole_rows_on_a_tiny_model(tiny_models, tmp_path):
    """The similarity the recipe computes equals a plain float64 one from transformers' own attention, both
    ways; where a layer's proximal and distant attention disagree, a δ between the two signals groups the layers
    differently."""
    from surgery.calibrate.layer_runner import LayerRunner
    from surgery.checkpoint.families import surgery_config_from_source
    from surgery.checkpoint.sources import resolve
    from surgery.recipes.pod import PoD

    folder = local_layer_model(tiny_models, tmp_path / "qwen2")
    source = resolve(str(folder))
    ids = torch.randint(0, source.config["vocab_size"], (2, 1024), generator=torch.Generator().manual_seed(3))
    config = surgery_config_from_source(source.config)
    plans = {signal: PoD(delta=0.0, sinks=4, recent=256, similarity=signal).plan(
        LayerRunner(folder, config, ids, batch_size=2), ids, progress=False) for signal in ("whole", "distant")}
    reference = plain_attention(load_reference(folder), ids)
    signals = {"whole": reference, "distant": [distant_attention(a, 4, 256) for a in reference]}
    for signal, attention in signals.items():
        for layer in range(1, len(attention)):  # δ = 0: every layer is compared with layer 0
            for head in range(attention[0].shape[1]):
                if config.is_sliding(layer):  # no distant tokens: never compared, keeps its own keys
                    assert plans[signal]["key_source"][layer][head] == layer
                    continue
                expected = plain_similarity(attention[layer], attention[0], head)
                assert plans[signal]["similarity"][layer][head] == pytest.approx(expected, abs=1e-6)
    whole, distant = plans["whole"]["similarity"][1][0], plans["distant"]["similarity"][1][0]
    assert distant - whole > 0.01  # its distant attention is closer to layer 0's than its whole rows are
    groups = {signal: GreedyGrouping((whole + distant) / 2) for signal in signals}
    for signal, grouping in groups.items():
        for layer, attention in enumerate(signals[signal]):
            grouping.add(layer, attention)
    assert groups["whole"].key_source[1][0] == 1 and groups["distant"].key_source[1][0] == 0


@pytest.fixture(scope="module")
def pod_options():
    return dict(num_samples=2, seq_len=1024, recipe_options={"recent": 32, "sinks": 4})


def test_delta_above_one_shares_nothing_and_is_the_source(tiny_with_tokenizer, tmp_path, pod_options):
    out = run_convert(tiny_with_tokenizer, tmp_path / "pod", recipe="pod",
                      **{**pod_options, "recipe_options": {**pod_options["recipe_options"], "delta": 1.01}})
    model = load_remote(out)
    assert all(source == layer for layer, sources in enumerate(model.config.pod_key_source) for source in sources)
    ids = torch.randint(0, 49152, (1, 80), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(ids).logits, load_reference(tiny_with_tokenizer)(ids).logits, atol=1e-5)


def test_delta_zero_groups_everything_and_only_distant_tokens_change(tiny_with_tokenizer, tmp_path, pod_options):
    options = {**pod_options["recipe_options"], "delta": 0.0, "skip_threshold": 0.7}
    out = run_convert(tiny_with_tokenizer, tmp_path / "pod", recipe="pod", **{**pod_options, "recipe_options": options})
    model, source = load_remote(out), load_reference(tiny_with_tokenizer)
    assert model.config.pod_key_source == [[0, 0]] * model.config.num_hidden_layers
    assert model.config.pod_distant_skip == 0.7  # the skip rule itself: test_pod_arch
    assert "model.layers.1.self_attn.k_proj.weight" in model.state_dict()  # proximal keys still need it
    ids = torch.randint(0, 49152, (1, 80), generator=torch.Generator().manual_seed(1))
    short, long = model(ids[:, :36]).logits, model(ids).logits
    assert torch.allclose(short, source(ids[:, :36]).logits, atol=1e-5)  # every token is proximal
    assert not torch.allclose(long[:, 40:], source(ids).logits[:, 40:], atol=1e-3)


@pytest.mark.parametrize("recipes, needle", [("kvsharer,pod", "pod cannot be combined with kvsharer"),
                                             ("matryoshka,pod", "pod cannot be combined with matryoshka"),
                                             ("pod,dynamickv", "pod cannot be combined with dynamickv")])
def test_pod_refuses_recipes_it_cannot_compose_with(tiny_with_tokenizer, tmp_path, recipes, needle):
    result = cli("convert", tiny_with_tokenizer, "--recipe", recipes, "--out", tmp_path / "out")
    assert_clean_failure(result, needle)
    assert not (tmp_path / "out").exists()


def test_a_skip_threshold_outside_zero_one_is_refused(tiny_with_tokenizer, tmp_path):
    result = cli("convert", tiny_with_tokenizer, "--recipe", "pod", "--skip-threshold", "1.5", "--out", tmp_path / "out")
    assert_clean_failure(result, "--skip-threshold")
    assert not (tmp_path / "out").exists()


def test_short_calibration_samples_are_refused(tiny_with_tokenizer, tmp_path):
    result = cli("convert", tiny_with_tokenizer, "--recipe", "pod", "--seq-len", "256", "--out", tmp_path / "out")
    assert_clean_failure(result, "at least 1,024 tokens", "--seq-len 1024")


def test_adapt_trains_queries_and_keys_of_borrowing_layers_only_at_the_recipes_rate(tiny_with_tokenizer, tmp_path, pod_options):
    from safetensors.torch import load_file

    from surgery.adapt.engine import AdaptSettings, adapt

    ckpt = run_convert(tiny_with_tokenizer, tmp_path / "pod", recipe="pod",
                       **{**pod_options, "recipe_options": {**pod_options["recipe_options"], "delta": 0.0}})
    settings = AdaptSettings(teacher=str(tiny_with_tokenizer), steps=2, batch_size=2, seq_len=80, num_samples=4,
                             save_every=0)
    out = adapt(ckpt, tmp_path / "trained", settings, verify=False, progress=False)
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    layers = range(1, 4)  # delta 0: every layer above 0 borrows both heads' distant keys from layer 0
    allowed = {f"model.layers.{i}.self_attn.{p}.{w}" for i in layers for p in ("q_proj", "k_proj") for w in ("weight", "bias")}
    assert changed and changed <= allowed
    assert {name.split(".")[4] for name in changed} == {"q_proj", "k_proj"}
    assert yaml.safe_load((out / "recipe.yaml").read_text())["adapt"]["lr"] == 1e-2  # PoD's rate, not adapt's 1e-3
