"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): source layouts read under the surgery names, the
attention recipes on MoE models, measured expert dispatch, and `surgery inspect`. Identity against each family's
transformers class is in test_identity.py."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import save_tiny
from helpers import cli, decode_stepwise, load_remote, run_convert
from surgery.checkpoint.tensor_io import LazyCheckpoint


def test_mixtral_experts_are_read_under_the_surgery_names(tiny_models):
    folder = tiny_models["mixtral"]
    stored = load_file(folder / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.1.w3.weight" in stored  # how transformers saves Mixtral
    reader = LazyCheckpoint(folder)
    for ours, theirs in (("mlp.experts.1.gate_proj", "block_sparse_moe.experts.1.w1"),
                         ("mlp.experts.1.up_proj", "block_sparse_moe.experts.1.w3"),
                         ("mlp.experts.1.down_proj", "block_sparse_moe.experts.1.w2"),
                         ("mlp.gate", "block_sparse_moe.gate")):
        name = f"model.layers.0.{ours}.weight"
        assert torch.equal(reader.get(name), stored[f"model.layers.0.{theirs}.weight"])
        assert reader.shapes()[name] == tuple(stored[f"model.layers.0.{theirs}.weight"].shape)
    assert not any("block_sparse_moe" in name for name in reader.names())


def test_fused_experts_are_sliced_per_expert(tmp_path):
    gate_up, down = torch.randn(3, 10, 4), torch.randn(3, 4, 5)  # [E, 2I, H], [E, H, I]
    save_file({"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down,
               "model.norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    reader = LazyCheckpoint(tmp_path)
    streamed = dict(reader.iter_shard(reader.shards()[0]))
    for expert in range(3):
        expected = {"gate_proj": gate_up[expert, :5], "up_proj": gate_up[expert, 5:], "down_proj": down[expert]}
        for projection, tensor in expected.items():
            name = f"model.layers.0.mlp.experts.{expert}.{projection}.weight"
            assert torch.equal(reader.get(name), tensor) and torch.equal(streamed[name], tensor)
            assert reader.shapes()[name] == tuple(tensor.shape)
    assert set(streamed) == set(reader.names()) and "model.norm.weight" in streamed


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_attention_recipes_run_unchanged_on_moe_models(tiny_models, tmp_path, family):
    out = run_convert(tiny_models[family], tmp_path / "shared", recipe="kvsharer,matryoshka",
                      recipe_options={"share_layers": 1, "kv_fraction": 0.5})
    model = load_remote(out)
    moe_layers = model.config.moe_layers
    assert moe_layers and all(type(model.model.layers[i].mlp).__name__ == "SurgeryMoE" for i in moe_layers)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    assert torch.allclose(decode_stepwise(model, ids, prompt=6)[0], full, atol=1e-5)

    # budgets act on full-attention layers: a Mixtral without a sliding window, as Mixtral-8x7B has none
    full_attention = save_tiny(tmp_path / "full", family, sliding_window=None) if family == "mixtral" else tiny_models[family]
    evicting = load_remote(run_convert(full_attention, tmp_path / "snap", recipe="snapkv",
                                       recipe_options={"keep": 0.5, "keep_at_least": 1, "window": 2}))
    with torch.no_grad():
        cache = evicting(ids[:1], use_cache=True).past_key_values
        evicting.generate(ids[:1], max_new_tokens=3, do_sample=False)
    dense = model.config.num_hidden_layers * 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    assert cache.kv_bytes_per_token() < dense


def test_expert_dispatch_is_counted(tiny_models, tmp_path):
    model = load_remote(run_convert(tiny_models["qwen3_moe"], tmp_path / "moe"))
    tokens = 2 * 9
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 9)))
    for index in model.config.moe_layers:
        mlp = model.model.layers[index].mlp
        assert mlp.tokens == tokens and sum(mlp.dispatched) == model.config.moe_top_k * tokens


def test_inspect_shows_experts_and_active_parameters(tiny_models):
    result = cli("inspect", tiny_models["mixtral"])
    assert result.exit_code == 0, result.output
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.output.splitlines() if "  " in line)
    stored = sum(t.numel() for t in load_file(tiny_models["mixtral"] / "model.safetensors").values())
    config = load_remote_config(tiny_models["mixtral"])
    idle = config.num_hidden_layers * (4 - 2) * 3 * config.hidden_size * config.intermediate_size
    assert lines["experts"] == f"4 per layer on {config.num_hidden_layers} of {config.num_hidden_layers} layers, top-2"
    assert lines["active parameters per token"] == f"{(stored - idle) / 1e6:.1f}M"


def load_remote_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)
