"""`surgery compare`: several checkpoints on the same tokens, a table, and Pareto plots."""

import json

import pytest

from helpers import assert_clean_failure, cli, run_convert
from surgery.evals.compare import pareto_front


def test_pareto_front_on_hand_made_points():
    # (KV bytes, perplexity): lower is better on both
    points = [(100, 10.0), (50, 12.0), (50, 11.0), (20, 30.0), (120, 9.0), (120, 10.0)]
    assert pareto_front(points, higher_is_better=False) == [3, 2, 0, 4]
    # (KV bytes, recall): higher recall is better
    recalls = [(100, 0.9), (50, 0.9), (20, 0.1), (10, 0.0), (60, 0.95)]
    assert pareto_front(recalls, higher_is_better=True) == [3, 2, 1, 4]


@pytest.fixture(scope="module")
def checkpoints(tiny_with_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    identity = run_convert(tiny_with_tokenizer, root / "identity", recipe="none")
    snapkv = run_convert(tiny_with_tokenizer, root / "snapkv", recipe="snapkv",
                         recipe_options={"keep": 0.3, "keep_at_least": 0, "window": 4})
    return identity, snapkv


SMALL = ["--segments", "1", "--prompt-len", "96", "--lengths", "300", "--samples", "1",
         "--tasks", "niah_single_number"]


def test_compare_writes_table_json_and_plots(tiny_with_tokenizer, checkpoints, tmp_path):
    identity, snapkv = checkpoints
    out = tmp_path / "report"
    result = cli("compare", identity, snapkv, "--baseline", tiny_with_tokenizer, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    points = json.loads((out / "compare.json").read_text())
    base, same, evicting = points
    assert [p["name"] for p in points] == [f"baseline ({tiny_with_tokenizer.name})", "identity", "snapkv"]
    # the identity checkpoint is the source model: same numbers on the same tokens as the stock baseline
    assert same["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)
    assert same["kv_bytes_per_token"] == base["kv_bytes_per_token"] and same["agreement"] == 1.0
    # SnapKV keeps 30% of the 96-token prompt, then the 128 scored tokens join the cache: measured from the tensors
    kept = round(0.3 * 96) + 128
    assert evicting["kv_bytes_per_token"] == pytest.approx(base["kv_bytes_per_token"] * kept / (96 + 128))
    assert "snapkv keeps 30% of each prompt" in evicting["setting"]
    for png in ("kv_vs_perplexity.png", "kv_vs_retrieval.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "compare.md").read_text()
    assert "| snapkv |" in table and "kv_vs_retrieval.png" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left behind


def test_compare_bad_input(tiny_with_tokenizer, checkpoints, tmp_path, monkeypatch):
    identity, _ = checkpoints
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert_clean_failure(cli("compare", identity, "--baseline", tiny_with_tokenizer, "--out", taken), "--overwrite")
    assert (taken / "keep.txt").read_text() == "mine"
    out = tmp_path / "new"
    assert_clean_failure(cli("compare", identity, "--baseline", tiny_with_tokenizer, "--out", out, "--tasks", "nope"),
                         "nope")
    assert_clean_failure(cli("compare", tmp_path / "missing", "--baseline", tiny_with_tokenizer, "--out", out),
                         "missing")
    assert not out.exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert_clean_failure(cli("compare", identity, "--baseline", tiny_with_tokenizer, "--out", out), "surgery[plots]")
