"""MatryoshkaKV conversion: PCA init, the rank search and its budget, composition with KVSharer."""

import json

import pytest
import torch
import yaml

from helpers import decode_stepwise, load_remote, run_convert
from surgery.calibrate.source_model import load_calibration_model
from surgery.base.errors import SurgeryError
from surgery.evals.evaluate import kv_bytes_per_token
from surgery.checkpoint.families import surgery_config_from_source
from surgery.arch.matryoshka_surgery import set_kv_ranks
from surgery.calibrate.layer_runner import LayerRunner
from surgery.recipes.matryoshka import KLCurves, KVStatistics, MatryoshkaKV, principal_bases, search_ranks
from surgery.checkpoint.sources import resolve


def test_pca_basis_matches_numpy_style_reference():
    """Eigenvectors of the centred covariance, by descending eigenvalue, computed independently with SVD."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator, dtype=torch.float64)
    mean, bases, eigenvalues = principal_bases(x.sum(0)[None], (x.T @ x)[None], x.shape[0])
    centred = x - x.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    assert torch.allclose(mean[0], x.mean(0))
    assert torch.allclose(eigenvalues[0], singular**2 / x.shape[0])
    for i in range(6):  # same directions up to sign
        assert abs(abs(bases[0][:, i] @ vh[i]) - 1) < 1e-8
    assert torch.allclose(bases[0].T @ bases[0], torch.eye(6, dtype=torch.float64), atol=1e-10)


def runner_for(folder, ids, batch_size=2) -> LayerRunner:
    return LayerRunner(folder, surgery_config_from_source(resolve(str(folder)).config), ids, batch_size)


def test_covariances_come_from_post_rope_keys(tiny_llama):
    """Statistics gathered layer by layer equal those of the whole model's cached (post-RoPE) keys."""
    source = resolve(str(tiny_llama))
    model = load_calibration_model(source, surgery_config_from_source(source.config))
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0))  # not the global RNG's order
    statistics = KVStatistics()
    runner_for(tiny_llama, ids).run(list(range(6)), record=False, visit=statistics.add)
    with torch.no_grad():
        keys = model(ids, use_cache=True).past_key_values.layers[2].keys.double()  # (3, kv, 10, d)
    per_head = keys.transpose(0, 1).flatten(1, 2)
    total, outer, count = statistics[2, "key"]
    assert count == 30
    # float32 keys from two computations of the same layers (layer by layer, whole model): equal to float32's
    # rounding, which the float64 sums carry, so relative to their size
    assert torch.allclose(total, per_head.sum(1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(outer, per_head.transpose(1, 2) @ per_head, rtol=1e-5, atol=1e-6)


def test_a_trial_equals_the_whole_model_with_that_rank(tiny_llama):
    """A search trial (one layer's head lowered, re-run from that layer) gives the KL of the whole model with
    the same projection, computed here from full forward passes."""
    source = resolve(str(tiny_llama))
    config = surgery_config_from_source(source.config)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    runner = runner_for(tiny_llama, ids)
    recipe = MatryoshkaKV()
    projections, _ = recipe.install_pca(runner, list(range(6)), progress=False)
    reference = runner.log_probs(runner.run(list(range(6))).final)
    score = recipe.trial_scorer(runner, projections, reference)

    model = load_calibration_model(source, config)
    with torch.no_grad():
        expected_reference = model(ids).logits.double().log_softmax(-1)
        full = [[16, 16]] * 6
        set_kv_ranks(model, full, full)
        model.model.layers[3].self_attn.kv_projection.load_state_dict(projections[3].state_dict())
        model.model.layers[3].self_attn.kv_projection.value_bases[1].rank = 6
        candidate = model(ids).logits.double().log_softmax(-1)
    expected = (expected_reference.exp() * (expected_reference - candidate)).sum(-1).mean().item()
    assert score((3, 1, "value"), 6) == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert expected > 1e-5  # the trial did change something


def synthetic_curves(seed: int, candidates: int = 12, head_dim: int = 16) -> tuple[KLCurves, dict]:
    """Random spectra and, per candidate, a KL that is some scale times the spectrum's tail (the fast search's
    model of a curve), so the fast search must find exactly what scoring every rank finds."""
    generator = torch.Generator().manual_seed(seed)
    keys = [(layer, head, kind) for layer in range(candidates // 4) for head in range(2) for kind in ("key", "value")]
    spectra = {key: torch.rand(head_dim, generator=generator, dtype=torch.float64).sort(descending=True).values
               for key in keys}
    scales = {key: float(torch.rand(1, generator=generator)) * 3 for key in keys}
    return KLCurves(head_dim, spectra), scales


def brute_force_greedy(table: dict, head_dim: int, steps_down: int) -> dict:
    """The greedy walk written plainly: take, `steps_down` times, the candidate whose next step adds least KL."""
    step = head_dim // 8
    ranks = {key: head_dim for key in {key for key, _ in table}}
    for _ in range(steps_down):
        def cost(key):
            now = 0.0 if ranks[key] == head_dim else table[key, ranks[key]]
            return table[key, ranks[key] - step] - now if ranks[key] > step else float("inf")
        chosen = min(sorted(ranks), key=cost)
        ranks[chosen] -= step
    return ranks


@pytest.mark.parametrize("budget", [0.75, 0.5, 0.25])
def test_exhaustive_search_is_the_greedy_walk(budget):
    curves, scales = synthetic_curves(seed=2)
    generator = torch.Generator().manual_seed(3)
    table = {(key, rank): float(torch.rand(1, generator=generator)) + (16 - rank) for key in curves.spectra
             for rank in range(2, 16, 2)}
    trials = []
    ranks = search_ranks(lambda key, rank: trials.append(1) or table[key, rank], curves, [budget], "exhaustive")[budget]
    assert len(trials) == 12 * 7
    assert ranks == brute_force_greedy(table, 16, round((1 - budget) * 12 * 8))


@pytest.mark.parametrize("budget", [0.75, 0.5, 0.375])
def test_fast_search_finds_the_exhaustive_ranks_on_spectral_curves_with_fewer_trials(budget):
    curves, scales = synthetic_curves(seed=4)

    def score(key, rank):
        spectrum = curves.spectra[key]
        return scales[key] * (spectrum[rank:].sum() / spectrum.sum()).item()

    exhaustive_curves = KLCurves(16, curves.spectra)
    expected = search_ranks(score, exhaustive_curves, [budget], "exhaustive")[budget]
    fast = search_ranks(score, curves, [budget], "fast")[budget]
    assert fast == expected
    assert sum(map(len, curves.measured.values())) < 0.5 * 12 * 7


@pytest.mark.parametrize("budget", [0.75, 0.375])
def test_searched_ranks_meet_the_budget_in_the_cache(tiny_llama, tmp_path, budget):
    out = run_convert(tiny_llama, tmp_path / "mkv", recipe="matryoshka", num_samples=6, seq_len=16,
                      recipe_options={"kv_fraction": budget, "search_samples": 1, "search_len": 12})
    model = load_remote(out)
    config = json.loads((out / "config.json").read_text())
    ranks = config["matryoshka_key_ranks"] + config["matryoshka_value_ranks"]
    assert all(r % 2 == 0 and 2 <= r <= 16 for layer in ranks for r in layer)  # steps of head_dim / 8
    full = 2 * 6 * 2 * 16 * 4  # K and V, 6 layers, 2 KV heads, head_dim 16, float32
    measured = kv_bytes_per_token(model, torch.randint(3, 128, (1, 12)))
    assert measured / full == pytest.approx(budget, abs=0.02 * budget)
    plan = yaml.safe_load((out / "recipe.yaml").read_text())["recipes"][0]["plan"]
    assert plan["kv_fraction"] == pytest.approx(budget, abs=1e-9)


def test_uniform_needs_an_eighth_step(tiny_llama, tmp_path):
    with pytest.raises(SurgeryError, match="steps of 1/8"):
        run_convert(tiny_llama, tmp_path / "bad", recipe="matryoshka", recipe_options={"kv_fraction": 0.3, "uniform": True})


def test_kvsharer_plus_matryoshka_loads_and_decodes(tiny_llama, tmp_path):
    out = run_convert(tiny_llama, tmp_path / "both", recipe="kvsharer,matryoshka", num_samples=6, seq_len=16,
                      verify=True, share_layers=2, threshold=-1.0, recipe_options={"kv_fraction": 0.5, "uniform": True})
    model = load_remote(out)
    assert len(model.config.sharing_layers) == 2
    ids = torch.randint(3, 128, (2, 14))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    stepwise, cache = decode_stepwise(model, ids, 6)
    assert (stepwise - full).abs().max() < 1e-5
    for layer, source in enumerate(model.config.kv_source):
        keys = cache.layers[layer].keys
        assert (keys is None) == (source != layer)
        if keys is not None:
            assert keys.shape[-1] == 2 * 8  # 2 KV heads at rank 8 of 16
    assert kv_bytes_per_token(model, ids) == pytest.approx(4 * 2 * 2 * 8 * 4)


def test_recipes_must_be_listed_in_composable_order(tiny_llama, tmp_path):
    with pytest.raises(SurgeryError, match="kvsharer,matryoshka"):
        run_convert(tiny_llama, tmp_path / "x", recipe="matryoshka,kvsharer")
