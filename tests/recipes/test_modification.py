"""The MoDification recipe: conversion equals the source, training moves the routers (and, if asked, the routed
layers) towards the target skip rate and the skipped compute is measured, composition, bad input."""

import json

import pytest
import torch

from helpers import assert_clean_failure, cli, load_reference, load_remote, run_convert
from surgery.metrics.compute import layer_matmul_flops
from surgery.recipes.modification import MoDification


def test_fresh_routers_route_everything_and_equal_the_source(tiny_models, tmp_path):
    out = run_convert(tiny_models["llama"], tmp_path / "mod", recipe="modification", verify=True)
    model, source = load_remote(out), load_reference(tiny_models["llama"])
    assert model.config.modification_layers == list(range(1, model.config.num_hidden_layers, 2))
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - source(ids, attention_mask=mask).logits)[mask.bool()].abs().max() < 1e-5
        cache = model(ids[:1], use_cache=True).past_key_values
    config = model.config
    assert cache.kv_bytes_per_token() == config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4


def test_adapt_trains_only_the_routers_and_the_skipped_compute_is_measured(tiny_with_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from surgery.adapt.engine import adapt
    from surgery.adapt.settings import AdaptSettings

    ckpt = run_convert(tiny_with_tokenizer, tmp_path / "mod", recipe="modification",
                       recipe_options={"skip": 0.5, "train": "routers"})
    settings = AdaptSettings(teacher=str(tiny_with_tokenizer), steps=12, seq_len=64, num_samples=4, lr=0.3,
                             warmup_steps=0, save_every=0)
    out = adapt(ckpt, tmp_path / "trained", settings, verify=False, progress=False)
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".router." in name for name in changed)
    model = load_remote(out)
    ids = torch.randint(3, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    routed = {i: model.model.layers[i].router.routed_tokens for i in model.config.modification_layers}
    assert sum(routed.values()) < 0.9 * 64 * len(routed)  # trained towards skipping half: tokens now skip
    per_token = 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    dense_layers = model.config.num_hidden_layers - len(routed)
    assert cache.kv_bytes() == (dense_layers * 64 + sum(routed.values())) * per_token  # skipped tokens hold no K/V

    quality = cli("eval", out, "--baseline", tiny_with_tokenizer, "--segments", "1", "--prompt-len", "200",
                  "--score-tokens", "20", "--context", "64")
    assert quality.exit_code == 0, quality.stderr
    results = json.loads((out / "eval_results.json").read_text())["quality"]["model"]
    assert 0.1 < results["tokens_skipped"] < 1.0
    layers = model.config.num_hidden_layers
    skipped_passes = results["tokens_skipped"] * len(routed)
    assert results["flops_per_token"] == pytest.approx((layers - skipped_passes) * layer_matmul_flops(model.config))
    assert "tokens skipping each routed layer" in quality.output


def test_train_layers_moves_only_routers_and_routed_layers_at_their_scaled_rate(tiny_with_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from surgery.adapt.engine import adapt
    from surgery.adapt.settings import AdaptSettings
    from surgery.recipes.growth import layer_of

    ckpt = run_convert(tiny_with_tokenizer, tmp_path / "mod", recipe="modification",
                       recipe_options={"train": "layers", "layer_lr_scale": 0.01})
    steps, lr = 4, 0.3
    settings = AdaptSettings(teacher=str(tiny_with_tokenizer), steps=steps, seq_len=32, num_samples=2, batch_size=2,
                             lr=lr, warmup_steps=0, save_every=0)
    out = adapt(ckpt, tmp_path / "trained", settings, verify=False, progress=False)
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    routed = set(json.loads((out / "config.json").read_text())["modification_layers"])
    moved = {name: (after[name] - before[name]).abs().max().item() for name in before}
    changed = {name for name, step in moved.items() if step > 0}
    assert changed and all(layer_of(name) in routed for name in changed)
    layer_weights = [name for name in changed if ".router." not in name]
    assert {layer_of(name) for name in layer_weights} == routed  # every routed layer trains
    # Adam moves a weight by about lr per step (exactly lr on the first): at lr × 0.01 the routed layers move < 0.3.
    assert max(moved[name] for name in layer_weights) <= 1.5 * steps * lr * 0.01


def test_layer_flops_are_the_projection_and_mlp_multiply_adds(tiny_models):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models["llama"])
    linear = sum(2 * module.in_features * module.out_features
                 for module in load_reference(tiny_models["llama"]).model.layers[0].modules()
                 if isinstance(module, torch.nn.Linear))
    config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert layer_matmul_flops(config) == linear


def test_the_regulariser_is_the_papers_plus_the_target_penalty():
    class Router:
        def __init__(self, fraction, mean):
            self.fraction, self.mean = torch.tensor(fraction), torch.tensor(mean)

    class Layer:
        def __init__(self, router):
            self.router = router

    model = type("M", (), {"model": type("B", (), {"layers": [Layer(Router(0.9, 0.7)), Layer(None),
                                                              Layer(Router(0.5, 0.4))]})()})()
    recipe = MoDification(skip=0.25, skip_weight=2.0, aux_alpha=0.1)
    paper = 0.1 * (0.9 * 0.7 + 0.5 * 0.4)
    target = 2.0 * ((0.1 - 0.25) ** 2 + (0.5 - 0.25) ** 2) / 2
    assert float(recipe.regulariser(model)) == pytest.approx(paper + target)


def test_chosen_layers_and_matryoshka_compose(tiny_models, tmp_path):
    out = run_convert(tiny_models["llama"], tmp_path / "both", recipe="matryoshka,modification",
                      recipe_options={"route_layers": "0,2"}, num_samples=2, seq_len=16)
    model = load_remote(out)
    assert model.config.modification_layers == [0, 2] and model.config.matryoshka_key_ranks is not None
    alone = load_remote(run_convert(tiny_models["llama"], tmp_path / "alone", recipe="matryoshka", num_samples=2,
                                    seq_len=16))
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the routers start routing every token: the projected model's own logits
        assert (model(ids).logits - alone(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("recipes, needle", [
    ("kvsharer,modification", "kvsharer"),
    ("modification,snapkv", "snapkv"),
    ("attention-gate,modification", "attention-gate"),
])
def test_sharing_and_eviction_are_refused(tiny_models, tmp_path, recipes, needle):
    assert_clean_failure(cli("convert", tiny_models["llama"], "--recipe", recipes, "--out", tmp_path / "x"),
                         "cannot be combined", needle)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("options, needle", [
    (("--route-layers", "1,x"), "--route-layers"),
    (("--route-layers", "7"), "--route-layers"),
    (("--route-threshold", "1.5"), "--route-threshold"),
    (("--skip", "1"), "--skip"),
    (("--skip-weight", "-1"), "--skip-weight"),
    (("--aux-alpha", "-0.5"), "--aux-alpha"),
    (("--train", "everything"), "--train"),
    (("--layer-lr-scale", "0"), "--layer-lr-scale"),
    (("--router-bias", "0.1", "--route-threshold", "0.9"), "--router-bias"),
])
def test_bad_routing_options_fail_cleanly(tiny_models, tmp_path, options, needle):
    result = cli("convert", tiny_models["llama"], "--recipe", "modification", *options, "--out", tmp_path / "x")
    assert_clean_failure(result, needle)
    assert not (tmp_path / "x").exists()
