"""Depth growth: LESA and its baselines (LLaMA-Pro, SOLAR, copy) write plain family checkpoints that stock
transformers loads; identity cases equal the source; the layouts follow the papers' formulas; LESA's latent
blocks, predictor and norms; adapt trains what each method trains; bad input."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny
from helpers import assert_clean_failure, cli, load_reference, run_convert
from surgery.recipes.growth import layer_of
from surgery.recipes.lesa import fit_predictor, latent_blocks, lesa_loss


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """An 8-layer llama (biases on) with untied embeddings."""
    return save_tiny(tmp_path_factory.mktemp("grow") / "llama8", "llama", seed=3, num_hidden_layers=8)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("recipe, options", [
    ("lesa", {}), ("depth-up", {"method": "llama-pro"}), ("depth-up", {"method": "solar"}), ("depth-up", {"method": "copy"}),
])
def test_growing_by_zero_layers_is_the_identity(tiny8, tmp_path, recipe, options):
    out = run_convert(tiny8, tmp_path / "grown", recipe=recipe, recipe_options={**options, "target_layers": 8})
    source, grown = load_file(tiny8 / "model.safetensors"), load_file(out / "model.safetensors")
    assert grown.keys() == source.keys() and all(torch.equal(grown[name], source[name]) for name in source)


def test_llama_pro_equals_the_source_and_loads_without_remote_code(tiny8, tmp_path):
    out = run_convert(tiny8, tmp_path / "pro", recipe="depth-up", verify=True,
                      recipe_options={"method": "llama-pro", "target_layers": 12})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 12 and "auto_map" not in config
    assert config["grown_layers"] == [2, 5, 8, 11]  # LLaMA-Pro: 4 groups of 2, a new layer after 1, 3, 5, 7
    assert not list(out.glob("*.py"))
    shown = cli("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert any(line.startswith("new layers (depth growth)") and line.endswith(" 2, 5, 8, 11")
               for line in shown.output.splitlines()), shown.output
    grown, source = load_reference(out), load_reference(tiny8)  # stock transformers, no trust_remote_code
    assert type(grown).__name__ == "LlamaForCausalLM"
    assert torch.allclose(logits(grown, IDS), logits(source, IDS), atol=1e-5)
    prompt = IDS[:1, :6]
    assert torch.equal(grown.generate(prompt, max_new_tokens=8, do_sample=False),
                       source.generate(prompt, max_new_tokens=8, do_sample=False))
    tensors, original = load_file(out / "model.safetensors"), load_file(tiny8 / "model.safetensors")
    assert not tensors["model.layers.11.self_attn.o_proj.weight"].any() and not tensors["model.layers.11.mlp.down_proj.weight"].any()
    assert torch.equal(tensors["model.layers.11.self_attn.q_proj.weight"], original["model.layers.7.self_attn.q_proj.weight"])
    assert torch.equal(tensors["model.layers.11.mlp.up_proj.weight"], original["model.layers.7.mlp.up_proj.weight"])


def test_llama_pro_places_one_new_layer_after_each_group_of_l_over_n():
    """The paper's block expansion: L layers in n groups of L/n, a copy after each group's top layer."""
    from surgery.recipes.depth_up import DepthUp

    def plain(layers: int, added: int) -> list[int]:
        size = layers // added
        return [group * size + size - 1 for group in range(added)]

    for layers, added in ((32, 8), (30, 15), (8, 4), (24, 6), (40, 8)):
        layout = DepthUp(method="llama-pro", target_layers=layers + added).make_layout(layers)
        assert [lower for kind, lower in layout if kind == "new"] == plain(layers, added)
    lesa_like = DepthUp(method="llama-pro", target_layers=10, insert_range="2:6").make_layout(8)
    assert [lower for kind, lower in lesa_like if kind == "new"] == [2, 5]  # --insert-range still decides


def test_solar_and_copy_layouts(tiny8, tmp_path):
    # SOLAR, 8 → 12: drop m1 = 2 layers from the end of the first copy, m2 = 2 from the start of the second.
    solar = load_file(run_convert(tiny8, tmp_path / "solar", recipe="depth-up",
                                  recipe_options={"method": "solar", "target_layers": 12}) / "model.safetensors")
    original = load_file(tiny8 / "model.safetensors")
    expected = list(range(0, 8 - 2)) + list(range(2, 8))
    for index, layer in enumerate(expected):
        assert torch.equal(solar[f"model.layers.{index}.mlp.gate_proj.weight"], original[f"model.layers.{layer}.mlp.gate_proj.weight"])
    copy = load_file(run_convert(tiny8, tmp_path / "copy", recipe="depth-up",
                                 recipe_options={"method": "copy", "target_layers": 9}) / "model.safetensors")
    # one new layer, in the middle gap of the upper half (after source layer 4 or 5), a copy of the layer below
    new = [i for i in range(9) if i > 0 and torch.equal(copy[f"model.layers.{i}.mlp.down_proj.weight"],
                                                         copy[f"model.layers.{i - 1}.mlp.down_proj.weight"])]
    assert len(new) == 1 and new[0] in (5, 6)


def test_solar_drops_seven_and_eight_for_30_to_45():
    from surgery.recipes.depth_up import DepthUp

    layout = DepthUp(method="solar", target_layers=45).make_layout(30)
    assert [layer for _, layer in layout] == list(range(0, 30 - 7)) + list(range(8, 30))


@pytest.mark.parametrize("out,width", [(6, 5), (12, 2)])
def test_latent_blocks_from_the_gram_matrix_are_the_direct_svds(out, width):
    """Accumulated layer by layer, the blocks are those of one SVD of the layers side by side (up to each
    component's sign, which the SVD leaves open), and every layer is reconstructed; a rank below `out` too."""
    torch.manual_seed(0)
    weights = [torch.randn(out, width, dtype=torch.float64) for _ in range(4)]
    read_layers = []
    basis, blocks = latent_blocks(lambda i: read_layers.append(i) or weights[i], len(weights))
    u, s, vh = torch.linalg.svd(torch.cat(weights, dim=1), full_matrices=False)
    rank = min(out, 4 * width)
    assert len(blocks) == 4 and blocks[0].shape == (rank, width)
    signs = torch.sign((basis.double() * u[:, :rank]).sum(0))  # +1 or −1 per component
    assert torch.allclose(basis.double().abs(), (u[:, :rank] * s[:rank]).abs(), atol=1e-5)
    for layer, weight in enumerate(weights):
        assert torch.allclose((basis @ blocks[layer]).double(), weight, atol=1e-5)
        direct = vh[:rank, layer * width:(layer + 1) * width] * signs[:, None]
        assert torch.allclose(blocks[layer].double(), direct, atol=1e-5)
    assert read_layers == [0, 1, 2, 3] * 2  # one pass for the Gram matrix, one for the blocks: a layer at a time


def test_lesa_loss_is_the_official_notebooks_by_default_and_per_row_by_name():
    """Official (train_LESA.ipynb): MSE(‖outputs‖₂, ‖Y‖₂), one scalar per batch from the whole batch's 2-norms;
    "rows": the mean squared difference of per-row norms. Both weighted 0.9995/0.0005 against the plain MSE."""
    predicted, target = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    mse = sum((p - t) ** 2 for p, t in zip(predicted.flatten().tolist(), target.flatten().tolist())) / 28
    whole = (sum(x * x for x in predicted.flatten().tolist()) ** 0.5 - sum(x * x for x in target.flatten().tolist()) ** 0.5) ** 2
    rows = sum((sum(x * x for x in p) ** 0.5 - sum(x * x for x in t) ** 0.5) ** 2
               for p, t in zip(predicted.tolist(), target.tolist())) / 7
    assert lesa_loss(predicted, target).item() == pytest.approx(0.9995 * mse + 0.0005 * whole, abs=1e-12)
    assert lesa_loss(predicted, target, "rows").item() == pytest.approx(0.9995 * mse + 0.0005 * rows, abs=1e-12)
    from surgery.recipes.lesa import LESA
    assert LESA().norm_term == "official"


def test_predictor_learns_a_smooth_depth_trend_better_than_chance():
    """Layers whose weights vary smoothly with depth: the held-out layer is predictable from its neighbours."""
    torch.manual_seed(0)
    base, slope, curve = torch.randn(16, 12), torch.randn(16, 12), torch.randn(16, 12)
    weights = [base + slope * (i / 10) + curve * math.sin(i / 3) for i in range(10)]
    basis, blocks = latent_blocks(lambda i: weights[i], len(weights))
    _, errors = fit_predictor(basis, blocks, weights[6], held_out=6, epochs=60, hidden=64, seed=0)
    assert errors["predictor"] < 0.2 and errors["neighbour_mean"] < 0.2
    assert errors["zeros"] == pytest.approx(1.0)  # the reference an error above 1 is worse than


def test_lesa_new_layers_are_predicted_and_normed_from_their_neighbours(tiny8, tmp_path):
    out = run_convert(tiny8, tmp_path / "lesa", recipe="lesa", recipe_options={"target_layers": 10})
    grown, original = load_file(out / "model.safetensors"), load_file(tiny8 / "model.safetensors")
    new = json.loads((out / "config.json").read_text())["grown_layers"]
    assert new == [4, 8]  # after source layers 3 and 6: 2 of the 4 upper-half gaps, spread
    for index, lower in zip(new, (3, 6)):
        for suffix in ("input_layernorm.weight", "self_attn.q_proj.bias"):  # norms and biases: the mean
            mean = (original[f"model.layers.{lower}.{suffix}"] + original[f"model.layers.{lower + 1}.{suffix}"]) / 2
            assert torch.allclose(grown[f"model.layers.{index}.{suffix}"], mean)
        for projection in ("self_attn.k_proj", "mlp.down_proj"):  # in the span of the SVD basis, not a copy
            weight = grown[f"model.layers.{index}.{projection}.weight"]
            stack = torch.cat([original[f"model.layers.{i}.{projection}.weight"] for i in range(8)], dim=1)
            u = torch.linalg.svd(stack, full_matrices=False)[0]
            assert torch.allclose(u @ (u.T @ weight), weight, atol=1e-4)
            assert all(not torch.allclose(weight, original[f"model.layers.{i}.{projection}.weight"]) for i in range(8))
    record = (out / "recipe.yaml").read_text()
    assert "neighbour_mean" in record and "held_out_layer" in record
    first = load_file(run_convert(tiny8, tmp_path / "first", recipe="lesa",
                                  recipe_options={"target_layers": 10, "norms": "first"}) / "model.safetensors")
    assert torch.equal(first["model.layers.4.post_attention_layernorm.weight"],
                       original["model.layers.0.post_attention_layernorm.weight"])  # the official code's choice


@pytest.mark.parametrize("recipe, options, trains_all", [
    ("lesa", {"target_layers": 6}, False),
    ("depth-up", {"method": "solar", "target_layers": 6}, True),
])
def test_adapt_trains_new_layers_with_the_language_model_loss(tiny_with_tokenizer, tmp_path, recipe, options, trains_all):
    from surgery.adapt.engine import adapt
    from surgery.adapt.settings import AdaptSettings

    ckpt = run_convert(tiny_with_tokenizer, tmp_path / "grown", recipe=recipe, recipe_options=options)
    settings = AdaptSettings(teacher=str(tiny_with_tokenizer), steps=2, seq_len=32, num_samples=2, batch_size=2,
                             save_every=0)
    steps = []
    out = adapt(ckpt, tmp_path / "trained", settings, verify=False, progress=False,
                on_step=lambda step, model: steps.append((step, model.training)))
    assert steps == [(0, True), (1, True), (2, True)]  # before training, then after each optimizer step
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    new = set(json.loads((out / "config.json").read_text())["grown_layers"])
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    if trains_all:
        assert changed == set(before)
    else:
        assert changed and {layer_of(name) for name in changed} == new
    assert "alpha: 0.0" in (out / "recipe.yaml").read_text()  # cross-entropy only
    assert type(load_reference(out)).__name__ == "LlamaForCausalLM"


def test_growth_composes_before_attention_recipes(tiny8, tmp_path):
    out = run_convert(tiny8, tmp_path / "both", recipe="depth-up,kvsharer",
                      recipe_options={"method": "llama-pro", "target_layers": 10, "share_layers": 2})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "surgery" and config["num_hidden_layers"] == 10
    assert config["grown_layers"] == [4, 9] and sum(s != i for i, s in enumerate(config["kv_source"])) == 2


@pytest.mark.parametrize("args, needle", [
    (("--recipe", "lesa", "--target-layers", "6"), "fewer than"),
    (("--recipe", "lesa", "--target-layers", "20"), "gaps"),
    (("--recipe", "depth-up", "--insert-range", "5"), "--insert-range"),
    (("--recipe", "depth-up", "--insert-range", "3:8"), "--insert-range"),
    (("--recipe", "depth-up", "--method", "solar", "--target-layers", "17"), "--target-layers"),
    (("--recipe", "depth-up", "--method", "solar", "--insert-range", "1:3"), "--insert-range"),
    (("--recipe", "lesa,depth-up"), "depth-up"),
    (("--recipe", "kvsharer,lesa"), "lesa,kvsharer"),
    (("--recipe", "depth-up", "--method", "stack"), "--method"),
])
def test_bad_growth_options_fail_cleanly(tiny8, tmp_path, args, needle):
    assert_clean_failure(cli("convert", tiny8, *args, "--out", tmp_path / "x"), needle)
    assert not (tmp_path / "x").exists()


def test_a_grown_plain_checkpoint_is_not_grown_again(tiny8, tmp_path):
    grown = run_convert(tiny8, tmp_path / "grown", recipe="depth-up", recipe_options={"target_layers": 10})
    assert json.loads((grown / "config.json").read_text())["grown_layers"] == [4, 9]  # LLaMA-Pro: after 3 and 7
    assert_clean_failure(cli("convert", grown, "--recipe", "lesa", "--out", tmp_path / "again"), "already grown")
    assert not (tmp_path / "again").exists()
    inspected = cli("inspect", grown)  # the new layers are read back from the plain config
    assert inspected.exit_code == 0 and "4, 9" in inspected.output


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_llama_pro_grows_moe_models_exactly(tiny_models, tmp_path, family):
    out = run_convert(tiny_models[family], tmp_path / "pro", recipe="depth-up",
                      recipe_options={"method": "llama-pro", "target_layers": 6})
    grown, source = load_reference(out), load_reference(tiny_models[family])
    assert grown.config.num_hidden_layers == 6
    assert torch.allclose(logits(grown, IDS), logits(source, IDS), atol=1e-5)
    import yaml

    layout = yaml.safe_load((out / "recipe.yaml").read_text())["recipes"][0]["plan"]["layout"]
    source_sparse = {i for i, layer in enumerate(source.model.layers) if hasattr(layer.mlp, "experts")}
    grown_sparse = [i for i, layer in enumerate(grown.model.layers) if hasattr(layer.mlp, "experts")]
    assert grown_sparse == [i for i, (_, layer) in enumerate(layout) if layer in source_sparse]


def test_predictor_training_gathers_its_rows_batch_by_batch():
    """No tensor of every triplet's rows is made: the largest tensor training creates is a batch's, not the data's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.numel())
            return out

    torch.manual_seed(0)
    weights = [torch.randn(40, 30) for _ in range(8)]
    basis, blocks = latent_blocks(lambda i: weights[i], len(weights))
    with Largest() as probe:
        fit_predictor(basis, blocks, weights[5], held_out=5, epochs=1, hidden=16, seed=0, batch_size=8)
    every_row = 5 * 30 * 2 * 30  # 5 training triplets × 30 latent rows × both neighbours' 30 columns
    assert probe.largest < every_row / 2  # the held-out prediction at the end is the largest: one layer's rows
