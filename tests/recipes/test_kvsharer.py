"""KVSharer: the paper's distance and search, the cache layout, and decoding against a no-cache reference."""

import itertools

import pytest
import torch

from factories import tiny_surgery_model
from safetensors import safe_open

from helpers import decode_stepwise, load_remote, run_convert
from surgery.arch import SurgeryCache, SurgeryForCausalLM
from surgery.arch.kvsharer_surgery import set_kv_sources
from surgery.calibrate.source_model import load_calibration_model
from surgery.checkpoint.families import surgery_config_from_source
from surgery.calibrate.layer_runner import LayerRunner
from surgery.recipes.kvsharer import KVSharer, mean_post_rope_kv, pair_distances, share
from surgery.checkpoint.sources import resolve


def tiny_sharing_model(kv_source, seed=0) -> SurgeryForCausalLM:
    return tiny_surgery_model(seed, layers=6, max_positions=64, kv_source=kv_source)


PLAN = [0, 1, 0, 3, 1, 0]


def test_sharing_layers_have_no_kv_projections():
    model = tiny_sharing_model(PLAN)
    names = set(model.state_dict())
    for layer, source in enumerate(PLAN):
        owns = source == layer
        assert (f"model.layers.{layer}.self_attn.k_proj.weight" in names) == owns
        assert (f"model.layers.{layer}.self_attn.v_proj.weight" in names) == owns
        assert f"model.layers.{layer}.self_attn.q_proj.weight" in names


def test_cache_holds_kv_for_owners_only():
    model = tiny_sharing_model(PLAN)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        cache = model(ids[:, :1], past_key_values=cache, use_cache=True).past_key_values
    assert isinstance(cache, SurgeryCache)
    for layer, source in enumerate(PLAN):
        held = cache.layers[layer].keys
        assert (held is not None) == (source == layer)
        if held is not None:
            assert tuple(held.shape) == (2, 2, 10, 8)
    owners = len(set(PLAN))
    # bytes counted from the tensors equal 2 (K and V) x owners x kv_heads x head_dim x 4 bytes per token
    assert cache.kv_bytes_per_token() == 2 * owners * 2 * 8 * 4


@pytest.mark.parametrize("padded", [False, True])
def test_incremental_decode_equals_full_forward(padded):
    """Multi-step decoding with the shared cache gives the logits of a no-cache forward over the whole sequence."""
    model = tiny_sharing_model(PLAN, seed=3)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (2, 16), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    prompt = 8
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
    incremental, cache = decode_stepwise(model, ids, prompt, mask)
    real = mask.bool()
    assert (incremental - full)[real].abs().max() < 1e-5
    assert cache.layers[0].keys.shape[-2] == ids.shape[1]  # the source layer holds each token exactly once


def test_generate_matches_no_cache_generate():
    model = tiny_sharing_model(PLAN, seed=4)
    ids = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_pair_distance_matches_plain_formula():
    """D(i,j) = ½(mean_{h,t} ‖K̄_i[h,t] − K̄_j[h,t]‖₂ + same for V), written out with loops in float64."""
    generator = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, 3, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    values = [torch.randn(2, 3, 4, generator=generator, dtype=torch.float64) for _ in range(3)]

    def plain(a, b):
        total = 0.0
        for h, t in itertools.product(range(2), range(3)):
            total += sum((x - y) ** 2 for x, y in zip(a[h, t].tolist(), b[h, t].tolist())) ** 0.5
        return total / 6

    distances = pair_distances(keys, values)
    assert set(distances) == {(1, 0), (2, 0), (2, 1)}
    for (i, j), d in distances.items():
        assert d == pytest.approx(0.5 * (plain(keys[i], keys[j]) + plain(values[i], values[j])), rel=1e-12)


def runner_for(folder, ids, batch_size=4) -> LayerRunner:
    return LayerRunner(folder, surgery_config_from_source(resolve(str(folder)).config), ids, batch_size)


def test_mean_kv_is_post_rope_average_over_samples(tmp_path):
    model = tiny_sharing_model(list(range(6)), seed=5)
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, 97, (5, 7))
    runner = LayerRunner(tmp_path / "m", model.config, ids, batch_size=2)
    keys, values = mean_post_rope_kv(runner.run(list(range(6))), ids.shape[0])
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values  # post-RoPE K as stored by the attention
    assert torch.allclose(keys[3], cache.layers[3].keys.double().mean(0), atol=1e-6)
    assert torch.allclose(values[3], cache.layers[3].values.double().mean(0), atol=1e-6)


def test_share_resolves_chains_to_the_root():
    assert share([0, 1, 2, 3], layer=3, onto=1) == [0, 1, 2, 1]
    assert share([0, 1, 1, 3], layer=3, onto=2) == [0, 1, 1, 1]
    # a layer that others read from starts sharing: its readers follow it to the new root
    assert share([0, 1, 2, 2, 4], layer=2, onto=0) == [0, 1, 0, 0, 4]


@pytest.mark.parametrize("order,pick", [("dissimilar", max), ("similar", min)])
def test_search_visits_pairs_in_paper_order(tiny_llama, order, pick):
    """With every candidate accepted, the first shared pair is the most (or least) dissimilar one."""
    source = resolve(str(tiny_llama))
    model = load_calibration_model(source, surgery_config_from_source(source.config))
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    runner = runner_for(tiny_llama, ids)
    distances = pair_distances(*mean_post_rope_kv(runner.run(list(range(6))), ids.shape[0]))
    plan = KVSharer(share_layers=1, threshold=-1.0, order=order).plan(runner_for(tiny_llama, ids), ids, progress=False)
    expected = pick(distances, key=distances.get)
    assert (plan["shared"][0]["layer"], plan["shared"][0]["onto"]) == expected


@pytest.mark.parametrize("kv_source", [[0, 1, 2, 3, 4, 5], [0, 1, 1, 3, 1, 3]])
def test_layer_by_layer_runs_equal_the_whole_model(tiny_llama, kv_source):
    """The runner's final hidden states equal the whole model's, and a trial from layer 2 equals a full run."""
    source = resolve(str(tiny_llama))
    model = load_calibration_model(source, surgery_config_from_source(source.config))
    ids = torch.randint(3, 128, (5, 9), generator=torch.Generator().manual_seed(1))
    runner = runner_for(tiny_llama, ids, batch_size=2)
    runner.run(list(range(6)))
    trial = runner.run(kv_source, start=2, commit=False)
    set_kv_sources(model, kv_source)
    with torch.no_grad():
        whole = model.model(ids, use_cache=False).last_hidden_state
    assert (torch.cat(trial.final) - whole).abs().max() < 1e-5
    assert (torch.cat(runner_for(tiny_llama, ids, 2).run(kv_source).final) - whole).abs().max() < 1e-5


def test_search_keeps_only_changes_above_threshold(tiny_llama):
    source = resolve(str(tiny_llama))
    model = load_calibration_model(source, surgery_config_from_source(source.config))
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    recipe = KVSharer(share_layers=1)
    reference = model.model(ids, use_cache=False).last_hidden_state.double()

    def similarity_of(kv_source):
        """Mean cosine of final-norm hidden states, shared vs original, computed here in float64."""
        set_kv_sources(model, kv_source)
        shared = model.model(ids, use_cache=False).last_hidden_state.double()
        set_kv_sources(model, list(range(6)))
        return torch.nn.functional.cosine_similarity(shared, reference, dim=-1).mean().item()

    keys, values = mean_post_rope_kv(runner_for(tiny_llama, ids).run(list(range(6))), ids.shape[0])
    pairs = recipe.ordered_pairs(pair_distances(keys, values), seed=0)
    singles = [similarity_of(share(list(range(6)), layer, onto)) for layer, onto in pairs]
    threshold = (singles[0] + max(singles[1:])) / 2
    assert singles[0] < threshold < max(singles[1:])  # the first candidate must be refused, a later one taken
    strict = KVSharer(share_layers=1, threshold=threshold).plan(runner_for(tiny_llama, ids), ids, progress=False)
    taken = next(i for i, s in enumerate(singles) if s > threshold)
    assert strict["candidates_tried"] == taken + 1
    (step,) = strict["shared"]
    assert (step["layer"], step["onto"]) == pairs[taken] and step["similarity"] > threshold
    assert abs(step["similarity"] - singles[taken]) < 1e-4
    with pytest.raises(Exception, match="above threshold"):
        KVSharer(share_layers=3, threshold=1.0).plan(runner_for(tiny_llama, ids), ids, progress=False)


def test_exported_checkpoint_drops_kv_weights(tiny_llama, tmp_path):
    out = run_convert(tiny_llama, tmp_path / "shared", recipe="kvsharer", share_layers=2, threshold=-1.0,
                      num_samples=4, seq_len=16)
    model = load_remote(out)
    sharing = model.config.sharing_layers
    assert len(sharing) == 2
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    for layer in range(6):
        assert (f"model.layers.{layer}.self_attn.k_proj.weight" in names) == (layer not in sharing)
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    assert sum(layer.keys is not None for layer in cache.layers) == 4


@pytest.mark.slow
def test_demo_kvsharer_saves_23_percent_of_kv_bytes(demo_source, tmp_path):
    """7 of 30 SmolLM2 layers sharing: the cache's own tensors shrink by 7/30 = 23.3%."""
    from surgery.evals.evaluate import kv_bytes_per_token

    out = run_convert("demo", tmp_path / "smol", recipe="kvsharer", share_layers=7, num_samples=8, seq_len=32)
    model = load_remote(out)
    ids = torch.randint(3, 1000, (1, 64))
    base_bytes = 2 * 30 * 3 * 64 * 4  # float32 K and V for 30 layers x 3 KV heads x 64 dims
    saved = 1 - kv_bytes_per_token(model, ids) / base_bytes
    assert saved == pytest.approx(7 / 30, abs=0.01)


def test_layer_by_layer_in_bfloat16_stays_close_to_float32(tiny_llama):
    ids = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(2))
    config = surgery_config_from_source(resolve(str(tiny_llama)).config)
    full = torch.cat(LayerRunner(tiny_llama, config, ids, 2).run(list(range(6))).final)
    half = LayerRunner(tiny_llama, config, ids, 2, dtype=torch.bfloat16).run(list(range(6))).final
    half = torch.cat(half).float()
    assert half.dtype == torch.float32 and not torch.equal(half, full)  # it really ran in bfloat16
    assert ((half - full).norm() / full.norm()).item() < 0.05
    plan = KVSharer(share_layers=2, threshold=-1.0).plan(LayerRunner(tiny_llama, config, ids, 2, dtype=torch.bfloat16),
                                                         ids, progress=False)
    assert len(plan["shared"]) == 2
