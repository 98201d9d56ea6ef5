"""Invariant 1: identity conversion reproduces the family's transformers class exactly; and a sliding-window
layer's cache holds what transformers' sliding cache layer holds, token for token."""

import pytest
import torch

from factories import ALL_FAMILIES, save_tiny
from helpers import load_reference, load_remote, run_convert

FAMILIES = ALL_FAMILIES


def batch_with_left_padding(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 14), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_matches_family(tiny_models, tmp_path, family):
    out = run_convert(tiny_models[family], tmp_path / "out", recipe="none")
    reference, converted = load_reference(tiny_models[family]), load_remote(out)
    assert type(converted).__name__ == "SurgeryForCausalLM"
    ids, mask = batch_with_left_padding(reference.config.get_text_config().vocab_size)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        got = converted(ids, attention_mask=mask).logits
        got_no_cache = converted(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert (expected - got)[real].abs().max() < 1e-5
    assert (expected - got_no_cache)[real].abs().max() < 1e-5

    with torch.no_grad():
        kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        expected_tokens = reference.generate(ids, **kwargs)
        got_tokens = converted.generate(ids, **kwargs)
        got_tokens_no_cache = converted.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(expected_tokens, got_tokens)
    assert torch.equal(expected_tokens, got_tokens_no_cache)


@pytest.mark.slow
def test_identity_on_smollm2(demo_source, tmp_path):
    """Real weights: fp32 logits within 1e-4, and the same 64-token greedy continuation with and without cache."""
    out = run_convert("demo", tmp_path / "smol", recipe="none")
    reference, converted = load_reference(demo_source.folder), load_remote(out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_source.folder)
    prompts = ["The history of the printing press begins", "def fibonacci(n):"]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = reference(**batch).logits
        got = converted(**batch).logits
    real = batch["attention_mask"].bool()
    assert (expected - got)[real].abs().max().item() <= 1e-4

    single = tokenizer(prompts[:1], return_tensors="pt")
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
    with torch.no_grad():
        expected_tokens = reference.generate(**single, **kwargs)
        assert torch.equal(expected_tokens, converted.generate(**single, **kwargs))
        assert torch.equal(expected_tokens, converted.generate(**single, use_cache=False, **kwargs))


def stock_kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2", "gemma3_text"])
def test_identity_cache_holds_what_stock_holds(tiny_models, tmp_path, family):
    """At every length, below, at and beyond the window, and through decode steps, the identity checkpoint's
    cache holds as many K/V bytes as stock transformers' cache for the same model: a sliding layer keeps only its
    window; and the logits stay the same."""
    out = run_convert(tiny_models[family], tmp_path / "out", recipe="none")
    reference, converted = load_reference(tiny_models[family]), load_remote(out)
    ids = torch.randint(3, 120, (2, 30), generator=torch.Generator().manual_seed(4))
    window = reference.config.sliding_window
    for prompt in (3, window - 1, window, window + 1, 20):
        with torch.no_grad():
            stock = reference(ids[:, :prompt], use_cache=True)
            ours = converted(ids[:, :prompt], use_cache=True)
            stock_cache, our_cache = stock.past_key_values, ours.past_key_values
            assert our_cache.kv_bytes() == stock_kv_bytes(stock_cache), (prompt, "prefill")
            for step in range(prompt, prompt + 4):
                stock = reference(ids[:, step : step + 1], past_key_values=stock_cache, use_cache=True)
                ours = converted(ids[:, step : step + 1], past_key_values=our_cache, use_cache=True)
                assert our_cache.kv_bytes() == stock_kv_bytes(stock_cache), (prompt, step)
                assert (stock.logits - ours.logits).abs().max() < 1e-5
    assert our_cache.kv_bytes() < 2 * 2 * 2 * 16 * 4 * 24 * reference.config.num_hidden_layers  # really bounded


def test_longrope_crosses_original_max_positions(tmp_path):
    """Phi-3's longrope switches from the short to the long factors once a sequence passes
    original_max_position_embeddings, and generation recomputes the cache at that step (as transformers' Phi-3
    does): for a prompt below the limit that generates past it, and a prompt beyond it, every step's logits are
    the transformers class's full forward over the sequence so far. (transformers 5.4's own generate keeps the
    short-rotated cache there, so its steps past the limit differ from its own full forward.)"""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 10 for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 16}
    source = save_tiny(tmp_path / "phi3", "phi3", rope_parameters=rope, max_position_embeddings=64,
                       original_max_position_embeddings=16)
    out = run_convert(source, tmp_path / "out", recipe="none")
    reference, converted = load_reference(source), load_remote(out)
    assert converted.config.rope_parameters["rope_type"] == "longrope"
    ids = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    for prompt in (10, 20):
        with torch.no_grad():
            got = converted.generate(ids[:, :prompt], **kwargs)
            for step, logits in enumerate(got.logits):
                expected = reference(got.sequences[:, : prompt + step]).logits[:, -1]
                assert (logits - expected).abs().max() < 1e-4, (prompt, step)
    short = dict(rope, long_factor=rope["short_factor"])
    plain = save_tiny(tmp_path / "short", "phi3", rope_parameters=short, max_position_embeddings=64,
                      original_max_position_embeddings=16)
    with torch.no_grad():  # the long factors really act beyond position 16
        assert (load_reference(plain)(ids[:, :20]).logits - reference(ids[:, :20]).logits)[:, 16:].abs().max() > 1e-3
