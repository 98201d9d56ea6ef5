"""What each recipe does on the families with sliding-window layers (Gemma 2 and 3, Mistral) and on Phi-3, as the
README's family table says: which layers a recipe acts on, what a sliding layer keeps, and the one-line refusals."""

import json

import pytest
import torch
from safetensors import safe_open

from factories import save_tiny
from helpers import assert_clean_failure, cli, load_reference, load_remote, run_convert
from surgery.arch import SurgeryConfig

CALIBRATION = {"num_samples": 2, "seq_len": 32, "seed": 3}


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def prefill_cache(folder, length: int = 40):
    model = load_remote(folder)
    ids = torch.randint(3, 120, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids, use_cache=True).past_key_values, model.config


def test_kvsharer_pairs_only_layers_of_one_kind(tiny_models, tmp_path):
    out = run_convert(tiny_models["gemma2"], tmp_path / "out", "kvsharer", share_layers=2, threshold=-1.0, **CALIBRATION)
    config = config_of(out)
    kinds, sources = config["layer_types"], config["kv_source"]
    assert sum(source != layer for layer, source in enumerate(sources)) == 2
    assert all(kinds[layer] == kinds[source] for layer, source in enumerate(sources))
    with pytest.raises(Exception, match="of its kind"):  # and a config that pairs across kinds is invalid
        SurgeryConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                      kv_source=[0, 0], hidden_size=32, num_attention_heads=4)


def test_budget_evicts_full_attention_layers_and_sliding_layers_keep_their_window(tiny_models, tmp_path):
    out = run_convert(tiny_models["gemma3_text"], tmp_path / "out", "snapkv",
                      recipe_options={"keep": 0.3, "keep_at_least": 0, "window": 4})
    cache, config = prefill_cache(out, length=40)
    for layer, kind in enumerate(config.layer_types):
        held, seen = cache.layers[layer].held_tokens()
        stored = cache.layers[layer].values.shape[-2]
        if kind == "sliding_attention":
            assert stored == config.sliding_window - 1 and held == seen  # the window, nothing evicted
        else:
            assert held < seen and held == 2 * round(0.3 * 40)  # two KV heads, the budget each


def test_pod_groups_full_attention_layers_only(tiny_models, tmp_path):
    out = run_convert(tiny_models["gemma2"], tmp_path / "out", "pod", num_samples=2, seq_len=1024, seed=3,
                      recipe_options={"sinks": 2, "recent": 8, "delta": 0.0, "last_queries": 8})
    config = config_of(out)
    for layer, sources in enumerate(config["pod_key_source"]):
        if config["layer_types"][layer] == "sliding_attention":
            assert sources == [layer] * len(sources)  # never borrows, never lends
        else:
            assert all(config["layer_types"][source] == "full_attention" for source in sources)
    assert config["pod_key_source"][3] == [1, 1]  # δ = 0: the second global layer joins the first one's group


def test_gates_sit_on_full_attention_layers_only(tiny_models, tmp_path):
    out = run_convert(tiny_models["gemma2"], tmp_path / "out", "attention-gate")
    config = config_of(out)
    with safe_open(out / "model.safetensors", "pt") as handle:
        gated = {int(name.split(".")[2]) for name in handle.keys() if ".self_attn.gate." in name}
    assert gated == {layer for layer, kind in enumerate(config["layer_types"]) if kind == "full_attention"}


def test_routing_a_sliding_layer_is_refused_in_one_line(tiny_models, tmp_path):
    result = cli("convert", tiny_models["gemma2"], "--recipe", "modification", "--route-layers", "0,1",
                 "--out", tmp_path / "out")
    assert_clean_failure(result, "sliding-window layers (0)", "route full-attention layers: 1, 3")
    out = run_convert(tiny_models["gemma2"], tmp_path / "default", "modification")
    assert config_of(out)["modification_layers"] == [1, 3]  # the default: every other layer, full-attention ones


@pytest.mark.parametrize("recipe", ["snapkv", "attention-gate", "modification", "pod"])
def test_a_model_whose_every_layer_slides_is_refused_in_one_line(tiny_models, tmp_path, recipe):
    result = cli("convert", tiny_models["mistral"], "--recipe", recipe, "--out", tmp_path / "out")
    assert_clean_failure(result, "every layer of this mistral attends within a sliding window of 7 tokens")
    assert not (tmp_path / "out").exists()


def test_grown_gemma_is_a_plain_checkpoint_whose_new_layers_take_the_kind_below(tiny_models, tmp_path):
    """LLaMA-Pro on Gemma 3: a new layer copies the layer below it, its kind (window, RoPE base) included, and the
    grown model is a plain gemma3_text checkpoint that computes the source."""
    out = run_convert(tiny_models["gemma3_text"], tmp_path / "out", "depth-up",
                      recipe_options={"target_layers": 6, "method": "llama-pro"})
    config = config_of(out)
    assert config["model_type"] == "gemma3_text" and not list(out.glob("*.py"))
    source_kinds = config_of(tiny_models["gemma3_text"])["layer_types"]
    grown = config["grown_layers"]
    below = [layer - 1 - sum(g < layer for g in grown) for layer in grown]  # the source layer each copies
    assert [config["layer_types"][layer] for layer in grown] == [source_kinds[b] for b in below]
    ids = torch.randint(3, 120, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (load_reference(out)(ids).logits - load_reference(tiny_models["gemma3_text"])(ids).logits).abs().max() < 1e-5


def test_grown_phi3_is_a_surgery_checkpoint(tiny_models, tmp_path):
    """No plain Phi-3 checkpoint holds split projections: growth writes a surgery checkpoint, which computes the
    source."""
    out = run_convert(tiny_models["phi3"], tmp_path / "out", "depth-up",
                      recipe_options={"target_layers": 6, "method": "llama-pro"})
    assert config_of(out)["model_type"] == "surgery"
    ids = torch.randint(3, 120, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (load_remote(out)(ids).logits - load_reference(tiny_models["phi3"])(ids).logits).abs().max() < 1e-5


def test_matryoshka_on_gemma_heads_of_256(tmp_path):
    """Gemma's 256-wide heads: ranks move in steps of head_dim / 8 = 32, as the paper's; sliding layers are
    projected too and keep their window; decoding equals the full forward."""
    source = save_tiny(tmp_path / "source", "gemma2", head_dim=256, max_position_embeddings=256)
    out = run_convert(source, tmp_path / "out", "matryoshka", num_samples=2, seq_len=32, seed=3,
                      recipe_options={"kv_fraction": 0.5, "search_samples": 2, "search_len": 16})
    config = config_of(out)
    ranks = [r for layer in config["matryoshka_key_ranks"] + config["matryoshka_value_ranks"] for r in layer]
    assert all(r % 32 == 0 and 0 < r <= 256 for r in ranks) and sum(ranks) == len(ranks) * 128
    model = load_remote(out)
    ids = torch.randint(3, 120, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        cache = model(ids[:, :12], use_cache=True).past_key_values
        for t in range(12, 20):
            step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
        assert cache.layers[0].values.shape[-2] == 5  # a sliding layer (window 6) holds 5 tokens, projected
    assert (step - full).abs().max() < 1e-4


def test_gemma3_image_text_source_converts_to_a_text_only_checkpoint(tiny_models, tmp_path):
    out = run_convert(tiny_models["gemma3"], tmp_path / "out", "none")
    config = config_of(out)
    assert config["source_model_type"] == "gemma3" and "vision_config" not in config
    with safe_open(out / "model.safetensors", "pt") as handle:
        names = list(handle.keys())
    assert names and all(name.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head")) for name in names)
    assert (out / "generation_config.json").is_file()


def test_a_bidirectional_gemma_is_refused_in_one_line(tmp_path):
    source = save_tiny(tmp_path / "source", "gemma3_text", use_bidirectional_attention=True)
    assert_clean_failure(cli("convert", source, "--out", tmp_path / "out"), "attends bidirectionally")


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_inspect_reads_each_family_folder(tiny_models, family):
    result = cli("inspect", tiny_models[family])
    assert result.exit_code == 0, result.output
    assert family in result.output and "KV bytes/token (float32)" in result.output
    assert ("sliding-window layers" in result.output) == (family != "phi3")


def test_lesa_norms_first_copies_every_block_norm_of_gemma(tiny_models, tmp_path):
    """`--norms first` (the official LESA code) gives a new layer layer 0's norms: Gemma's four per block."""
    from safetensors.torch import load_file

    out = run_convert(tiny_models["gemma2"], tmp_path / "out", "lesa", num_samples=2, seq_len=32, seed=3,
                      recipe_options={"target_layers": 5, "norms": "first", "predictor_epochs": 1, "predictor_width": 16})
    weights, new = load_file(out / "model.safetensors"), config_of(out)["grown_layers"][0]
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert torch.equal(weights[f"model.layers.{new}.{norm}.weight"], weights[f"model.layers.0.{norm}.weight"]), norm


def test_an_image_text_config_without_its_text_config_is_refused_in_one_line(tiny_models, tmp_path):
    import shutil

    source = shutil.copytree(tiny_models["gemma3"], tmp_path / "source")
    config = config_of(source)
    del config["text_config"]
    (source / "config.json").write_text(json.dumps(config))
    assert_clean_failure(cli("convert", source, "--out", tmp_path / "out"), "has no text_config")
    assert not (tmp_path / "out").exists()
