"""Invariant 1: identity conversion reproduces the family's transformers class exactly."""

import pytest
import torch

from helpers import load_reference, load_remote, run_convert

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]


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
    ids, mask = batch_with_left_padding(reference.config.vocab_size)
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
