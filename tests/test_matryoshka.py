"""MatryoshkaKV conversion: PCA init, the rank search and its budget, composition with KVSharer."""

import json

import pytest
import torch
import yaml

from helpers import decode_stepwise, load_remote, run_convert
from surgery.convert import load_calibration_model
from surgery.errors import SurgeryError
from surgery.evaluate import kv_bytes_per_token
from surgery.families import surgery_config_from_source
from surgery.recipes.matryoshka import MatryoshkaKV, kv_covariances, principal_bases
from surgery.sources import resolve


def test_pca_basis_matches_numpy_style_reference():
    """Eigenvectors of the centred covariance, by descending eigenvalue, computed independently with SVD."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator, dtype=torch.float64)
    mean, bases = principal_bases(x.sum(0)[None], (x.T @ x)[None], x.shape[0])
    centred = x - x.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    assert torch.allclose(mean[0], x.mean(0))
    for i in range(6):  # same directions up to sign
        assert abs(abs(bases[0][:, i] @ vh[i]) - 1) < 1e-8
    assert torch.allclose(bases[0].T @ bases[0], torch.eye(6, dtype=torch.float64), atol=1e-10)


def test_covariances_come_from_post_rope_keys(tiny_llama):
    source = resolve(str(tiny_llama))
    model = load_calibration_model(source, surgery_config_from_source(source.config))
    ids = torch.randint(3, 128, (3, 10))
    stats = kv_covariances(model, ids, [2], batch_size=2)
    with torch.no_grad():
        keys = model(ids, use_cache=True).past_key_values.layers[2].keys.double()  # (3, kv, 10, d)
    per_head = keys.transpose(0, 1).flatten(1, 2)
    total, outer, count = stats[2, "key"]
    assert count == 30 and torch.allclose(total, per_head.sum(1)) and torch.allclose(outer, per_head.transpose(1, 2) @ per_head)


@pytest.mark.parametrize("budget", [0.75, 0.375])
def test_searched_ranks_meet_the_budget_in_the_cache(tiny_llama, tmp_path, budget):
    out = run_convert(tiny_llama, tmp_path / "mkv", recipe="matryoshka", num_samples=6, seq_len=16,
                      recipe_options={"budget": budget, "search_samples": 1, "search_len": 12})
    model = load_remote(out)
    config = json.loads((out / "config.json").read_text())
    ranks = config["kv_key_ranks"] + config["kv_value_ranks"]
    assert all(r % 2 == 0 and 2 <= r <= 16 for layer in ranks for r in layer)  # steps of head_dim / 8
    full = 2 * 6 * 2 * 16 * 4  # K and V, 6 layers, 2 KV heads, head_dim 16, float32
    measured = kv_bytes_per_token(model, torch.randint(3, 128, (1, 12)))
    assert measured / full == pytest.approx(budget, abs=0.02 * budget)
    plan = yaml.safe_load((out / "recipe.yaml").read_text())["recipes"][0]["plan"]
    assert plan["kv_fraction"] == pytest.approx(budget, abs=1e-9)


def test_search_lowers_the_cheapest_head_first(tiny_llama):
    """One greedy step takes the candidate with the smallest KL, checked against scoring every candidate."""
    source = resolve(str(tiny_llama))
    model = load_calibration_model(source, surgery_config_from_source(source.config))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    recipe = MatryoshkaKV(budget=1 - 1 / (8 * 24))  # one step below full: 24 (layer, head, K/V) of 8 steps each
    from surgery.recipes.matryoshka import kl_from, log_probs

    reference = log_probs(model, ids)
    owners = list(range(6))
    recipe.install_pca(model, ids, owners)
    full = {(l, h, k): 16 for l in owners for h in range(2) for k in ("key", "value")}
    scores = {}
    for candidate in full:
        ranks = {**full, candidate: 14}
        recipe.set_ranks(model, ranks, owners)
        scores[candidate] = kl_from(reference, log_probs(model, ids))
    snapshot = recipe.search(model, ids, reference, owners, [recipe.budget], progress=False)[recipe.budget]
    lowered = [c for c, r in snapshot.items() if r != 16]
    assert lowered == [min(scores, key=scores.get)]


def test_uniform_needs_an_eighth_step(tiny_llama, tmp_path):
    with pytest.raises(SurgeryError, match="steps of 1/8"):
        run_convert(tiny_llama, tmp_path / "bad", recipe="matryoshka", recipe_options={"budget": 0.3, "uniform": True})


def test_kvsharer_plus_matryoshka_loads_and_decodes(tiny_llama, tmp_path):
    out = run_convert(tiny_llama, tmp_path / "both", recipe="kvsharer,matryoshka", num_samples=6, seq_len=16,
                      verify=True, share_layers=2, threshold=-1.0, recipe_options={"budget": 0.5, "uniform": True})
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
