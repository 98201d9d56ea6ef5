"""The rewrite stage: a toy recipe renames, derives, drops and adds tensors, streamed shard by shard."""

import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from surgery.pipelines.convert import tensor_plan
from surgery.base.errors import SurgeryError
from surgery.checkpoint.export import expected_tensors
from surgery.checkpoint.families import surgery_config_from_source
from surgery.recipes.base import Recipe
from surgery.checkpoint.rewrite import DictWriter, TensorPlan, rewrite
from surgery.checkpoint.tensor_io import ShardWriter

SHARD = 40_000  # bytes: a handful of the tiny model's tensors per shard


@dataclass
class ToyRecipe(Recipe):
    """Moves layer 3's MLP into layer 1 (rename), predicts layer 2's q_proj from its neighbours (derive), replaces
    layer 0's o_proj (add), and drops layer 1's own MLP weights explicitly (drop)."""

    name = "toy"
    paper = "none"
    saves = "nothing"

    def rewrite(self, plan: TensorPlan) -> None:
        for part in ("gate_proj", "up_proj", "down_proj"):
            plan.rename(f"model.layers.1.mlp.{part}.weight", f"model.layers.3.mlp.{part}.weight")
            plan.drop(f"model.layers.1.mlp.{part}.weight")
        plan.derive("model.layers.2.self_attn.q_proj.weight",
                    ["model.layers.1.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"],
                    lambda below, above: (below + above) / 2)
        plan.add("model.layers.0.self_attn.o_proj.weight", torch.full((64, 64), 0.5))


@pytest.fixture
def sharded_source(tiny_models, tmp_path):
    """The tiny llama re-saved in many small shards with an index, as big checkpoints are."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", folder)
    writer = ShardWriter(folder, SHARD)
    for name, tensor in load_file(tiny_models["llama"] / "model.safetensors").items():
        writer.add(name, tensor)
    assert len(writer.finish()) > 6
    return folder


def test_toy_recipe_renames_derives_drops_and_adds(sharded_source, tmp_path):
    source = _all(sharded_source)
    config = surgery_config_from_source(json.loads((sharded_source / "config.json").read_text()))
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, SHARD)
    report = rewrite(sharded_source, expected_tensors(config), tensor_plan([ToyRecipe()]), writer)
    writer.finish()
    result = _all(out)
    assert set(result) == set(expected_tensors(config))
    for part in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(result[f"model.layers.1.mlp.{part}.weight"], source[f"model.layers.3.mlp.{part}.weight"])
        assert torch.equal(result[f"model.layers.3.mlp.{part}.weight"], source[f"model.layers.3.mlp.{part}.weight"])
        assert f"model.layers.1.mlp.{part}.weight" in report.dropped
    mean = (source["model.layers.1.self_attn.q_proj.weight"] + source["model.layers.3.self_attn.q_proj.weight"]) / 2
    assert torch.equal(result["model.layers.2.self_attn.q_proj.weight"], mean)
    assert torch.equal(result["model.layers.0.self_attn.o_proj.weight"], torch.full((64, 64), 0.5))
    untouched = [name for name in result if "layers.1.mlp" not in name and name not in (
        "model.layers.2.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight")]
    assert len(untouched) > 20 and all(torch.equal(result[name], source[name]) for name in untouched)
    total = sum(t.numel() * t.element_size() for t in source.values())
    assert report.peak_held_bytes <= 2 * SHARD < total / 4  # about one shard, never the model


def test_a_rule_for_a_tensor_the_model_lacks_lapses(sharded_source):
    """A later recipe may remove what an earlier one planned (KVSharer drops a grown layer's k_proj)."""
    config = surgery_config_from_source(json.loads((sharded_source / "config.json").read_text()))
    plan = TensorPlan()
    plan.add("model.layers.9.mlp.router.weight", torch.zeros(2, 64))
    plan.rename("model.layers.9.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight")
    writer = DictWriter()
    report = rewrite(sharded_source, expected_tensors(config), plan, writer)
    assert sorted(report.written) == sorted(expected_tensors(config)) == sorted(writer.tensors)


def test_a_derivation_with_a_missing_input_is_an_error(sharded_source):
    config = surgery_config_from_source(json.loads((sharded_source / "config.json").read_text()))
    plan = TensorPlan()
    plan.derive("model.norm.weight", ["model.norm.weight", "not.in.the.source"], lambda a, b: a)
    with pytest.raises(SurgeryError, match="model.norm.weight.*not.in.the.source"):
        rewrite(sharded_source, expected_tensors(config), plan, DictWriter())


def _all(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors
