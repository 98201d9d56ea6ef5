"""Sparse upcycling (`--recipe upcycle`) and AdaMoE null experts (`--recipe adamoe`): exactness against the dense
and MoE families' transformers classes, routing and the load-balancing loss against their formulas written plainly
in float64, measured dispatch, training through `surgery adapt`, and bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny
from helpers import assert_clean_failure, cli, decode_stepwise, load_reference, load_remote, run_convert
from surgery.arch.configuration_surgery import SurgeryConfig
from surgery.arch.mlp_surgery import SurgeryMoE
from surgery.train.balance import balance_loss, load_balancing_loss
from surgery.recipes.adamoe import AdaMoE
from surgery.metrics.compute import expert_mlp_flops, measured_compute, reset_counts

DENSE = {"llama": {"attention_bias": False}, "mistral": {}, "qwen2": {}, "qwen3": {}}


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {family: save_tiny(root / family, family, **extra) for family, extra in DENSE.items()}


@pytest.fixture(scope="module")
def tiny_text_llama(tmp_path_factory, demo_source):
    """A tiny llama without biases (upcyclable to a plain Qwen2-MoE) with SmolLM2's tokenizer."""
    folder = save_tiny(tmp_path_factory.mktemp("text") / "llama", "llama", seed=3, vocab_size=49152,
                       attention_bias=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_source.folder / name, folder / name)
    return folder


def ids(batch=2, length=12, seed=0):
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(DENSE))
def test_upcycled_model_is_a_plain_moe_checkpoint_that_computes_the_dense_model(dense_models, tmp_path, family):
    out = run_convert(dense_models[family], tmp_path / "up", recipe="upcycle", verify=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen3_moe" if family == "qwen3" else "qwen2_moe")
    assert "auto_map" not in config and not list(out.glob("*.py"))  # stock transformers, no remote code
    experts = config.get("num_experts") or config.get("num_local_experts")  # the name varies by transformers version
    assert experts == 4 and config["num_experts_per_tok"] == 2 and config["norm_topk_prob"]
    layers = config["num_hidden_layers"]
    assert config["mlp_only_layers"] == list(range(0, layers, 2))  # every other MLP upcycled: 1, 3, ...
    dense, upcycled = load_reference(dense_models[family]), load_reference(out)
    assert type(upcycled).__name__ == ("Qwen3MoeForCausalLM" if family == "qwen3" else "Qwen2MoeForCausalLM")
    tokens = ids()
    with torch.no_grad():
        assert torch.allclose(upcycled(tokens).logits, dense(tokens).logits, atol=1e-5)
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(upcycled.generate(tokens, **greedy), dense.generate(tokens, **greedy))
    weights, source = load_file(out / "model.safetensors"), load_file(dense_models[family] / "model.safetensors")
    for layer in range(1, layers, 2):
        for expert in range(4):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(weights[f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"],
                                   source[f"model.layers.{layer}.mlp.{projection}.weight"])
        assert weights[f"model.layers.{layer}.mlp.gate.weight"].shape == (4, config["hidden_size"])
        assert f"model.layers.{layer}.mlp.gate_proj.weight" not in weights


def test_upcycle_options_noise_and_determinism(dense_models, tmp_path):
    source = load_file(dense_models["llama"] / "model.safetensors")
    options = {"experts": 3, "top_k": 1, "every": 1, "noise": 0.1}
    first = load_file(run_convert(dense_models["llama"], tmp_path / "a", recipe="upcycle", recipe_options=options)
                      / "model.safetensors")
    again = load_file(run_convert(dense_models["llama"], tmp_path / "b", recipe="upcycle", recipe_options=options)
                      / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    dense = source["model.layers.0.mlp.up_proj.weight"]
    copies = [first[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] for e in range(3)]
    for copy in copies:  # each copy = dense + noise of 0.1 × the weight's std
        assert (copy - dense).std() == pytest.approx(0.1 * dense.std(), rel=0.25)
    assert not torch.equal(copies[0], copies[1])
    assert all(f"model.layers.{i}.mlp.gate.weight" in first for i in range(2))  # --every 1: all layers


def test_upcycle_composes_with_attention_recipes(dense_models, tmp_path):
    out = run_convert(dense_models["llama"], tmp_path / "both", recipe="upcycle,kvsharer", share_layers=1)
    model = load_remote(out)
    assert model.config.model_type == "surgery" and model.config.moe_layers == [1, 3]
    tokens = ids()
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
    assert torch.allclose(decode_stepwise(model, tokens, prompt=5)[0], full, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_adamoe_without_null_experts_is_the_source(tiny_models, tmp_path, family):
    source = load_reference(tiny_models[family])
    out = run_convert(tiny_models[family], tmp_path / "ada", recipe="adamoe",
                      recipe_options={"null_experts": 0, "top_k": source.config.num_experts_per_tok})
    model = load_remote(out)
    tokens = ids()
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, source(tokens).logits, atol=1e-5)


def test_adamoe_router_rows_repeat_the_true_experts(tiny_models, tmp_path):
    out = run_convert(tiny_models["qwen3_moe"], tmp_path / "ada", recipe="adamoe", recipe_options={"null_experts": 6})
    config = json.loads((out / "config.json").read_text())
    assert config["adamoe_null_experts"] == 6 and config["moe_top_k"] == 4 and config["moe_norm_topk"]
    weights, source = load_file(out / "model.safetensors"), load_file(tiny_models["qwen3_moe"] / "model.safetensors")
    for layer in config["moe_layers"]:
        true = source[f"model.layers.{layer}.mlp.gate.weight"]
        router = weights[f"model.layers.{layer}.mlp.gate.weight"]
        assert router.shape == (4 + 6, true.shape[1])
        assert torch.equal(router[:4], true)
        assert all(torch.equal(router[4 + j], true[j % 4]) for j in range(6))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_untrained_adamoe_is_the_source_because_ties_go_to_the_true_experts(tiny_models, tmp_path, family):
    """Null rows start as copies of the true rows (the paper), so each true expert ties with its copies. Ties are
    broken in favour of the true expert, explicitly (a stable sort), not by topk's implementation-defined order:
    before training every token runs the source's top-k true experts, and the logits are the source's."""
    source = load_reference(tiny_models[family])
    out = run_convert(tiny_models[family], tmp_path / "ada", recipe="adamoe")  # m = 2E, k = 2 × the source's
    model = load_remote(out)
    tokens = ids(batch=4, length=32)
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, source(tokens).logits, atol=1e-5)
        for layer in model.model.layers:
            if isinstance(layer.mlp, SurgeryMoE):
                x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
                weights, experts = layer.mlp.route(x)
                true = (experts < len(layer.mlp.experts)) & (weights > 0)
                assert true.sum(-1).tolist() == [source.config.num_experts_per_tok] * 256


def reference_moe(block: SurgeryMoE, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """AdaMoE's routing written plainly, token by token, in float64: softmax over E + m, top-k, the chosen true
    experts' weights renormalised (none chosen: zero update)."""
    experts = len(block.experts)
    out, used = torch.zeros(x.shape, dtype=torch.float64), []
    for t in range(x.shape[0]):
        logits = block.gate.weight.double() @ x[t].double()
        probabilities = torch.softmax(logits, dim=0)
        chosen = sorted(range(len(logits)), key=lambda i: -probabilities[i].item())[: block.top_k]
        true = [i for i in chosen if i < experts]
        used.append(len(true))
        total = sum(probabilities[i] for i in true)
        for i in true:
            mlp = block.experts[i].double()
            out[t] += probabilities[i] / total * mlp(x[t].double())
            block.experts[i].float()
    return out, used


def test_adamoe_routing_matches_the_formula_and_dispatches_only_true_experts():
    torch.manual_seed(0)
    config = SurgeryConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, moe_layers=[0], moe_experts=3, moe_intermediate_size=8,
                           moe_top_k=3, adamoe_null_experts=4)
    block = SurgeryMoE(config).eval()
    x = torch.randn(40, 16)
    with torch.no_grad():
        block.gate.weight[3:] *= 3  # strong null rows: some tokens choose only null experts
        block.gate.weight[:3] *= 0.2
        out = block(x)
    expected, used = reference_moe(block, x)
    assert 0 in used and max(used) > 0  # both kinds of tokens occur
    assert torch.allclose(out.double(), expected, atol=1e-5)
    assert all(out[t].abs().max() == 0 for t, count in enumerate(used) if count == 0)
    assert sum(block.dispatched) == sum(used) and block.tokens == 40  # null experts are never dispatched to

    model = type("Model", (), {})()  # measured compute of a one-layer model made of this block
    layer = type("Layer", (), {"mlp": block})()
    model.model, model.config = type("Inner", (), {"layers": [layer]})(), config
    compute = measured_compute(model)
    assert compute["experts_per_token"] == pytest.approx(sum(used) / 40)
    expected_mlp = 2 * (16 * 7 + sum(used) / 40 * 3 * 16 * 8)  # router over E + m rows, the true experts run
    assert compute["mlp_flops_per_token"] == pytest.approx(expected_mlp)
    assert expert_mlp_flops(config, sum(used) / 40) == pytest.approx(expected_mlp)
    reset_counts(model)
    assert block.tokens == 0 and sum(block.dispatched) == 0


def plain_balance(probabilities: torch.Tensor, chosen: torch.Tensor, true_experts: int) -> float:
    """AdaMoE's loss written plainly: (E + m) Σ_i f̃_i P_i, null experts' f replaced by their mean."""
    tokens, rows = probabilities.shape
    f = [sum(int(i in chosen[t].tolist()) * chosen[t].tolist().count(i) for t in range(tokens)) / tokens
         for i in range(rows)]
    if rows > true_experts:
        mean = sum(f[true_experts:]) / (rows - true_experts)
        f = f[:true_experts] + [mean] * (rows - true_experts)
    p = [sum(probabilities[t, i].item() for t in range(tokens)) / tokens for i in range(rows)]
    return rows * sum(fi * pi for fi, pi in zip(f, p))


def test_load_balancing_loss_is_the_papers_formula():
    torch.manual_seed(1)
    probabilities = torch.softmax(torch.randn(30, 9, dtype=torch.float64), dim=-1)
    chosen = torch.topk(probabilities, 3, dim=-1).indices
    for true_experts in (9, 4):
        assert load_balancing_loss(probabilities, chosen, true_experts).item() == pytest.approx(
            plain_balance(probabilities, chosen, true_experts), rel=1e-12)
    # without null experts it is transformers' Switch / Mixtral loss
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(30, 6)
    probabilities = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probabilities, 2, dim=-1).indices
    assert load_balancing_loss(probabilities, chosen, 6).item() == pytest.approx(
        load_balancing_loss_func((logits,), num_experts=6, top_k=2).item(), rel=1e-5)


def test_balance_loss_reads_the_training_forward_of_every_moe_layer(tiny_models, tmp_path):
    out = run_convert(tiny_models["qwen3_moe"], tmp_path / "ada", recipe="adamoe")
    model = load_remote(out)
    model.eval()
    with torch.no_grad():
        model(ids())
    assert balance_loss(model) is None  # nothing kept outside training
    model.train()
    model(ids())
    blocks = [model.model.layers[i].mlp for i in model.config.moe_layers]
    expected = sum(load_balancing_loss(*block.routing, 4) for block in blocks) / len(blocks)
    kept = [block.routing for block in blocks]
    loss = balance_loss(model)
    assert loss.requires_grad and loss.item() == pytest.approx(expected.item())
    assert all(block.routing is None for block in blocks)
    for block, routing in zip(blocks, kept):  # what `surgery adapt` adds: the recipe's coefficient × the loss
        block.routing = routing
    assert AdaMoE(balance_coef=0.5).regulariser(model).item() == pytest.approx(0.5 * expected.item())


def test_adamoe_decodes_incrementally_as_it_computes_in_full(tiny_models, tmp_path):
    model = load_remote(run_convert(tiny_models["qwen2_moe"], tmp_path / "ada", recipe="adamoe",
                                    recipe_options={"null_experts": 4, "top_k": 3}))
    with torch.no_grad():
        for block in (model.model.layers[i].mlp for i in model.config.moe_layers):
            block.gate.weight.normal_(0, 1)  # trained-like routers: tokens use 0 to 3 true experts
        tokens = ids(length=14)
        full = model(tokens, use_cache=False).logits
    assert torch.allclose(decode_stepwise(model, tokens, prompt=6)[0], full, atol=1e-5)
    reset_counts(model)
    with torch.no_grad():
        model(tokens)
    per_token = measured_compute(model)["experts_per_token"]
    assert 0 < per_token < 3


def test_inspect_shows_null_experts(tiny_models, tmp_path):
    out = run_convert(tiny_models["qwen3_moe"], tmp_path / "ada", recipe="adamoe")
    result = cli("inspect", str(out))
    assert result.exit_code == 0, result.output
    assert "top-4 of them and 8 null experts" in result.output and "at most" in result.output


@pytest.mark.parametrize("recipe, options, trained", [
    ("upcycle", {"moe_train": "experts"}, "moe"),
    ("upcycle,adamoe", {"moe_train": "routers", "null_experts": 2, "top_k": 3}, "routers"),
])
def test_adapt_trains_what_the_option_says_with_the_balance_loss(tiny_text_llama, tmp_path, recipe, options, trained):
    from surgery.adapt.engine import adapt
    from surgery.adapt.settings import AdaptSettings

    ckpt = run_convert(tiny_text_llama, tmp_path / "moe", recipe=recipe, recipe_options=options)
    settings = AdaptSettings(teacher=str(tiny_text_llama), steps=2, seq_len=32, num_samples=2, batch_size=2,
                             save_every=0, lr=1e-2)
    losses = []
    out = adapt(ckpt, tmp_path / "trained", settings, verify=True, progress=False,
                on_step=lambda step, model: losses.append(step))
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    routers = {name for name in before if name.endswith(".mlp.gate.weight")}
    experts = {name for name in before if ".mlp.experts." in name}
    assert changed == (routers | experts if trained == "moe" else routers)
    record = (out / "recipe.yaml").read_text()
    assert "alpha: 0.0" in record
    if recipe == "upcycle":  # still a plain Qwen2-MoE checkpoint, for stock transformers
        assert type(load_reference(out)).__name__ == "Qwen2MoeForCausalLM"
    else:
        assert load_remote(out).config.adamoe_null_experts == 2


@pytest.mark.parametrize("recipe, options, needle", [
    ("upcycle", {"top_k": 5}, "--top-k 5 is more than --experts 4"),
    ("upcycle", {"every": 9}, "--every 9"),
    ("adamoe", {}, "has none"),
])
def test_bad_expert_options_fail_in_one_line(dense_models, recipe, options, needle, tmp_path):
    args = ["convert", str(dense_models["llama"]), "--recipe", recipe, "--out", str(tmp_path / "out")]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert_clean_failure(cli(*args), needle)
    assert not (tmp_path / "out").exists()


def test_bad_moe_sources_fail_in_one_line(tiny_models, tmp_path):
    assert_clean_failure(cli("convert", str(tiny_models["mixtral"]), "--recipe", "upcycle", "--out", str(tmp_path / "a")),
                         "already has mixtures of experts")
    assert_clean_failure(cli("convert", str(tiny_models["mixtral"]), "--recipe", "adamoe", "--top-k", "40",
                             "--out", str(tmp_path / "b")), "top-k 40")
    # an o_proj bias has no place in a plain Qwen2-MoE; composed with an attention recipe it is a surgery checkpoint
    assert_clean_failure(cli("convert", str(tiny_models["llama"]), "--recipe", "upcycle", "--out", str(tmp_path / "c")),
                         "cannot hold this model")
    ada = run_convert(tiny_models["mixtral"], tmp_path / "ada", recipe="adamoe")
    assert_clean_failure(cli("convert", str(ada), "--recipe", "adamoe", "--out", str(tmp_path / "d")),
                         "already a surgery checkpoint")
    assert not any((tmp_path / name).exists() for name in "abcd")
