"""Eval metrics against plain references."""

import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from surgery.arch import SurgeryConfig, SurgeryForCausalLM
from conftest import tiny_config
from surgery.evals.evaluate import cache_kv_bytes_per_token, continuation_logits, greedy_agreement, perplexity, speed


def tiny_model():
    torch.manual_seed(0)
    config = SurgeryConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return SurgeryForCausalLM(config).eval()


def test_perplexity_single_window_is_exp_mean_nll():
    model = tiny_model()
    ids = torch.randint(0, 40, (1, 30))
    with torch.no_grad():
        log_probs = model(ids).logits.double().log_softmax(-1)
    nll = -sum(log_probs[0, t, ids[0, t + 1]].item() for t in range(29)) / 29
    assert abs(perplexity(model, ids, window=64, stride=32) - math.exp(nll)) < 1e-3


def test_strided_perplexity_scores_every_token_once():
    """With stride = window the windows are disjoint: the first token of each window has no target before it."""
    model = tiny_model()
    ids = torch.randint(0, 40, (1, 32))
    with torch.no_grad():
        nll = 0.0
        for start in (0, 16):
            chunk = ids[:, start : start + 16]
            log_probs = model(chunk).logits.double().log_softmax(-1)
            nll -= sum(log_probs[0, t, chunk[0, t + 1]].item() for t in range(15))
    assert abs(perplexity(model, ids, window=16, stride=16) - math.exp(nll / 30)) < 1e-3


def test_kv_bytes_of_a_dynamic_cache():
    cache = DynamicCache()
    for layer in range(3):
        cache.update(torch.zeros(2, 4, 10, 8), torch.zeros(2, 4, 10, 8), layer)
    assert cache_kv_bytes_per_token(cache) == 3 * 2 * 4 * 8 * 4


def test_greedy_agreement_counts_matching_argmax():
    model = tiny_model()
    prompt = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        own = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert greedy_agreement(model, own, 5) == 1.0
    corrupted = own.clone()
    corrupted[:, 5:] = (corrupted[:, 5:] + 1) % 40
    assert greedy_agreement(model, corrupted, 5) < 1.0


@pytest.mark.slow
def test_eval_command_writes_json_and_card(tiny_with_tokenizer, tmp_path):
    import json

    from click.testing import CliRunner

    from helpers import run_convert
    from surgery.cli.main import main

    out = run_convert(tiny_with_tokenizer, tmp_path / "shared", recipe="kvsharer", share_layers=1, threshold=-1.0,
                      num_samples=4, seq_len=16)
    result = CliRunner().invoke(main, ["-q", "eval", str(out), "--baseline", str(tiny_with_tokenizer),
                                       "--segments", "2", "--prompt-len", "300", "--score-tokens", "40",
                                       "--context", "64"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "eval_results.json").read_text())["quality"]
    for key in ("perplexity", "kv_bytes_per_token", "greedy_agreement", "prefill_tokens_per_s",
                "decode_tokens_per_s", "peak_memory_mib"):
        assert key in results["model"] and key in results["baseline"]
    assert abs(results["kv_bytes_saved"] - 1 / 4) < 1e-9  # 1 of 4 layers shares
    card = (out / "README.md").read_text()
    assert "| perplexity (held-out) |" in card and "KV-cache bytes per token (measured)" in card
    # intervals: perplexity over the eval segments, the paired ratio to the base model with its verdict
    from surgery.base.intervals import perplexity_interval, perplexity_of
    model = results["model"]
    assert model["perplexity"] == pytest.approx(perplexity_of(model["segment_nll"], model["segment_tokens"]))
    assert model["perplexity_interval"] == pytest.approx(list(perplexity_interval(model["segment_nll"],
                                                                                  model["segment_tokens"])))
    low, high = model["perplexity_interval"]
    assert f"{model['perplexity']:.3f} ({low:.3f}–{high:.3f})" in card
    ratio = results["perplexity_ratio"]
    assert ratio["interval"][0] <= ratio["value"] <= ratio["interval"][1]
    assert "perplexity / base model, paired over segments" in card and ratio["verdict"] in card
    assert len(model["greedy_agreement_interval"]) == 2


@pytest.mark.slow
def test_eval_with_offloaded_weights_measures_the_same_perplexity(tiny_with_tokenizer, tmp_path):
    """--max-memory below the model's size: accelerate offloads the weights to disk, and the numbers hold."""
    from helpers import run_convert
    from surgery.evals.evaluate import evaluate

    out = run_convert(tiny_with_tokenizer, tmp_path / "shared", recipe="kvsharer", share_layers=1, threshold=-1.0,
                      num_samples=4, seq_len=16)
    options = dict(progress=False, segments=1, prompt_len=300, score_tokens=40, speed_context=64)
    whole = evaluate(out, **options)["model"]
    offloaded = evaluate(out, max_memory=100_000, **options)["model"]
    assert offloaded["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
    assert offloaded["kv_bytes_per_token"] == whole["kv_bytes_per_token"]


@pytest.mark.parametrize("build", ["stock", "surgery"])
def test_cached_calls_use_the_installed_cache_keyword(build):
    """Eval hands caches over under the installed transformers' name: the stock class does not warn, and the
    logits read through the cache are the full forward's."""
    torch.manual_seed(0)
    model = (AutoModelForCausalLM.from_config(tiny_config("llama")) if build == "stock" else tiny_model()).eval()
    ids = torch.randint(0, 40, (1, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        logits, _ = continuation_logits(model, ids[:, :7], ids[:, 7:])
        speed(model, ids, 2)
    with torch.no_grad():
        full = model(ids).logits[:, 6:-1].float()
    assert torch.allclose(logits, full, atol=1e-5)
