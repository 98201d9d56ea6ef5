"""The Attention-Gate recipe: conversion equals the source, training moves only the gates towards the target keep
rate, composition, bad input."""

import json

import pytest
import torch
import yaml

from helpers import assert_clean_failure, cli, load_reference, load_remote, run_convert
from surgery.adapt.settings import AdaptSettings
from surgery.recipes.attention_gate import AttentionGateRecipe


def test_fresh_gates_keep_everything_and_equal_the_source(tiny_models, tmp_path):
    out = run_convert(tiny_models["llama"], tmp_path / "ag", recipe="attention-gate", verify=True)
    model, source = load_remote(out), load_reference(tiny_models["llama"])
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - source(ids, attention_mask=mask).logits)[mask.bool()].abs().max() < 1e-5
        cache = model(ids[:1], use_cache=True).past_key_values
    config = model.config
    assert config.attention_gate_width == config.head_dim // 8
    gate_state = 2 * config.attention_gate_heads * config.attention_gate_width * 4
    full = 2 * config.num_key_value_heads * config.head_dim * 4
    assert cache.kv_bytes_per_token() == config.num_hidden_layers * (full + gate_state)


def test_adapt_trains_only_the_gates_towards_the_target_keep_rate(tiny_with_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from surgery.adapt.engine import adapt

    ckpt = run_convert(tiny_with_tokenizer, tmp_path / "ag", recipe="attention-gate",
                       recipe_options={"target_keep": 0.3, "rate_weight": 10.0})
    settings = AdaptSettings(teacher=str(tiny_with_tokenizer), steps=12, seq_len=64, num_samples=4, lr=0.3,
                             warmup_steps=0, save_every=0)
    out = adapt(ckpt, tmp_path / "trained", settings, verify=False, progress=False)
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".self_attn.gate." in name for name in changed)
    record = yaml.safe_load((out / "recipe.yaml").read_text())["adapt"]
    assert record["batch_size"] == 1 and record["lr"] == 0.3  # the recipe's batch size, the user's rate
    model = load_remote(out)
    ids = torch.randint(3, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    kept = sum(int(cache.layers[layer].kept_slots().sum()) for layer in range(4)) / (4 * 2 * 64)
    assert kept < 0.9  # trained towards 30%: tokens now leave the cache
    assert cache.kept_fraction() == pytest.approx(kept)

    quality = cli("eval", out, "--baseline", tiny_with_tokenizer, "--segments", "1", "--prompt-len", "200",
                  "--score-tokens", "20", "--context", "64")
    assert quality.exit_code == 0, quality.stderr
    results = json.loads((out / "eval_results.json").read_text())["quality"]
    assert results["model"]["tokens_kept"] < 0.9 and results["baseline"]["tokens_kept"] == 1.0
    assert results["model"]["kv_bytes_per_token"] < results["baseline"]["kv_bytes_per_token"]
    assert "tokens kept per layer and KV head" in quality.output
    retrieval = cli("eval", out, "--task", "retrieval", "--tasks", "niah_single_number", "--lengths", "160", "--samples", "1")
    assert retrieval.exit_code == 0, retrieval.stderr
    assert "gated, niah_single_number" in retrieval.output


def test_recipe_defaults_fill_what_the_user_left_unset():
    settings = AdaptSettings(teacher="demo", seq_len=256).for_recipes([AttentionGateRecipe()])
    assert (settings.lr, settings.seq_len, settings.batch_size) == (1e-2, 256, 1)
    assert AdaptSettings(teacher="demo").for_recipes([]).seq_len == 128


def test_the_regulariser_is_squared_distance_to_the_target_per_layer_and_head():
    class Gate:
        def __init__(self, rate):
            self.rate = torch.tensor(rate)

    class Layer:
        def __init__(self, rate):
            self.self_attn = type("A", (), {"gate": Gate(rate)})()

    model = type("M", (), {"model": type("B", (), {"layers": [Layer([0.9, 0.3]), Layer([0.3, 0.0])]})()})()
    recipe = AttentionGateRecipe(target_keep=0.3, rate_weight=2.0)
    assert float(recipe.regulariser(model)) == pytest.approx(2.0 * (0.6**2 + 0 + 0 + 0.3**2) / 4)  # per (layer, head)


def test_composes_with_kvsharer(tiny_llama, tmp_path):
    out = run_convert(tiny_llama, tmp_path / "both", recipe="kvsharer,attention-gate", share_layers=1,
                      threshold=-1.0, num_samples=2, seq_len=16, verify=True)
    model = load_remote(out)
    sharing = model.config.sharing_layers
    assert sharing and all(model.model.layers[i].self_attn.gate is None for i in sharing)  # no gate, no weights
    assert all(model.model.layers[i].self_attn.gate is not None for i in model.config.owner_layers)


@pytest.mark.parametrize("recipes, needle", [
    ("attention-gate,snapkv", "snapkv"),
    ("pod,attention-gate", "pod"),
])
def test_other_eviction_is_refused(tiny_models, tmp_path, recipes, needle):
    assert_clean_failure(cli("convert", tiny_models["llama"], "--recipe", recipes, "--out", tmp_path / "x"),
                         "cannot be combined", needle)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("options, needle", [
    (("--gate-width", "17"), "--gate-width"),
    (("--gate-threshold", "1.5"), "--gate-threshold"),
    (("--target-keep", "0"), "--target-keep"),
    (("--open-bias", "-1"), "--open-bias"),
    (("--flag-noise", "-1"), "--flag-noise"),
    (("--gate-threshold", "0.9"), "--open-bias"),  # σ(1.0) = 0.73: every token would start evicted
])
def test_bad_gate_options_fail_cleanly(tiny_models, tmp_path, options, needle):
    result = cli("convert", tiny_models["llama"], "--recipe", "attention-gate", *options, "--out", tmp_path / "x")
    assert_clean_failure(result, needle)
    assert not (tmp_path / "x").exists()
