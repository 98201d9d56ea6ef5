"""Pass-key retrieval and compressed-prompt perplexity, for KV budget policies.

A haystack of real prose (Python's reference manual, offline) hides "The pass key is 12345. Remember it. 12345 is
the pass key." at a chosen depth; the model must answer the question greedily. (Asked as "What is the pass
key? The pass key is", SmolLM2 read "key" in the Python manual's sense and missed 2 of 3 at 1k tokens; the
"Question: ... Answer:" form gets 6/6.) Two protocols:

- query-aware: the question ends the prompt, so it sits in the observation window that scores the tokens;
- context-only: the context is compressed before the question is known (prefix caching, multi-turn chat), then
  the question is appended to the compressed cache. `probe=True` scores the context with a generic question
  (PROBE) that then leaves the cache.
"""

import click
import random
from dataclasses import dataclass

import torch

from surgery.metrics.cache_keyword import with_cache
from surgery.calibrate.corpora import HAYSTACK, corpus_text
from surgery.calibrate.text import read_text
from surgery.checkpoint.loading import load_source_model
from surgery.evals.evaluate import continuation_logits
from surgery.evals.evaluate import resolve_inputs
from surgery.evals.evaluate import setting_line
from surgery.evals.evaluate import setting_of

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nQuestion: What is the 5-digit pass key mentioned in the text above?\nAnswer: The pass key is"
PROBE = "\n\nQuestion: What are the important facts, names and numbers mentioned in the text above?\nAnswer:"
DEPTHS = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class PasskeyPrompt:
    context: torch.Tensor  # (1, n) haystack with the needle
    question: torch.Tensor  # (1, q)
    key: str
    length: int
    depth: float


def passkey_prompts(tokenizer, haystack: str, lengths: list[int], depths=DEPTHS, per_depth: int = 5,
                    seed: int = 0) -> list[PasskeyPrompt]:
    """Prompts of about `length` tokens (context + question), with random 5-digit keys at each depth."""
    rng = random.Random(seed)
    filler = tokenizer(haystack, add_special_tokens=False, verbose=False)["input_ids"]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    prompts = []
    for length in lengths:
        for depth in depths:
            for _ in range(per_depth):
                key = str(rng.randint(10000, 99999))
                needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
                room = length - len(needle) - len(question)
                start = rng.randint(0, max(0, len(filler) - room))
                text = filler[start : start + room]
                cut = int(depth * len(text))
                context = text[:cut] + needle + text[cut:]
                prompts.append(PasskeyPrompt(torch.tensor([context]), torch.tensor([question]), key, length, depth))
    return prompts


def answer_is_right(tokenizer, generated: torch.Tensor, key: str) -> bool:
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    digits = "".join(ch for ch in text if ch.isdigit())
    return digits.startswith(key)


def default_keep(model, keep: float | None) -> float | None:
    """The fraction of the prompt the model keeps: `keep` when given, else its checkpoint's budget; None for a
    model with no eviction policy (or a token-count budget, which `generate` applies itself)."""
    config = model.config
    if getattr(config, "kv_policy", None) is None:
        return None
    return keep if keep is not None else config.kv_budget


@torch.no_grad()
def ask(model, tokenizer, prompt: PasskeyPrompt, protocol: str, keep: float | None, probe: bool = False,
        new_tokens: int = 8) -> bool:
    """One pass-key question under a protocol; `keep` None or 1 means the full cache."""
    full = torch.cat([prompt.context, prompt.question], dim=1)
    generate = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    compress = keep is not None and keep < 1
    if protocol == "query-aware" or not compress:
        kwargs = {"kv_budget": keep if compress else 1.0} if getattr(model.config, "kv_policy", None) else {}
        out = model.generate(full, attention_mask=torch.ones_like(full), **generate, **kwargs)
    else:
        probe_ids = tokenizer(PROBE, add_special_tokens=False, return_tensors="pt")["input_ids"] if probe else None
        cache = model.compress_context(prompt.context, kv_budget=keep, probe_ids=probe_ids)
        out = model.generate(full, attention_mask=torch.ones_like(full), **with_cache(cache), **generate)
    return answer_is_right(tokenizer, out[:, full.shape[1]:], prompt.key)


def accuracy(model, tokenizer, prompts: list[PasskeyPrompt], protocol: str, keep: float | None, probe: bool,
             progress: bool, label: str) -> dict[str, str]:
    """Right answers per length and per length@depth, as "hits/prompts"."""
    from tqdm.auto import tqdm

    hits = {}
    for prompt in tqdm(prompts, desc=f"passkey {label}", disable=not progress, leave=False):
        right = ask(model, tokenizer, prompt, protocol, keep, probe)
        hits.setdefault(str(prompt.length), []).append(right)
        hits.setdefault(f"{prompt.length}@{prompt.depth:.0%}", []).append(right)
    return {key: f"{sum(v)}/{len(v)}" for key, v in hits.items()}


def continuation_perplexity(model, stream: torch.Tensor, prompt_length: int, keep: float | None) -> float:
    """Perplexity of the tokens after `prompt_length`, read through the prompt's cache (compressed to `keep`)."""

    prefill = {"kv_budget": keep if keep is not None else 1.0} if getattr(model.config, "kv_policy", None) else {}
    logits, _ = continuation_logits(model, stream[:, :prompt_length], stream[:, prompt_length:], **prefill)
    return float(torch.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), stream[0, prompt_length:])))


def passkey_report(model, tokenizer, haystack: str, lengths: list[int], keep: float | None, protocols: list[str],
                   probe: bool = False, per_depth: int = 2, seed: int = 0, progress: bool = True,
                   baseline=None) -> dict:
    """Accuracy per (protocol, length) and per depth at the model's keep fraction, next to the same prompts with
    the full cache (when the model evicts) and on the baseline (when given); and the perplexity of 128 tokens
    after a compressed prompt of the longest length, for each."""

    keep = default_keep(model, keep)
    prompts = passkey_prompts(tokenizer, haystack, lengths, per_depth=per_depth, seed=seed)
    stream = torch.tensor([tokenizer(haystack, add_special_tokens=False, verbose=False)["input_ids"][: max(lengths) + 128]])
    compresses = keep is not None and keep < 1
    results, perplexities = {}, {}
    for protocol in protocols if compresses else ["full cache"]:
        results[protocol] = accuracy(model, tokenizer, prompts, protocol, keep, probe, progress, protocol)
    perplexities["model"] = continuation_perplexity(model, stream, max(lengths), keep)
    if compresses:
        results["full cache"] = accuracy(model, tokenizer, prompts, "query-aware", 1.0, False, progress, "full cache")
        perplexities["full cache"] = continuation_perplexity(model, stream, max(lengths), 1.0)
    if baseline is not None:
        results["baseline"] = accuracy(baseline, tokenizer, prompts, "query-aware", None, False, progress, "baseline")
        perplexities["baseline"] = continuation_perplexity(baseline, stream, max(lengths), None)
    return {"task": "passkey", "setting": {**setting_of(model.config, keep), "probe": probe, "per_depth": per_depth},
            "results": results,
            "continuation_perplexity": {"prompt_tokens": max(lengths), "scored_tokens": 128, **perplexities}}


def evaluate_passkey(checkpoint: str, baseline: str | None, data: str | None, lengths: list[int],
                     keep: float | None, protocol: str, probe: bool, per_depth: int, allow_pickle: bool,
                     max_memory: int | None, progress: bool) -> dict:
    """`surgery eval --task passkey`: inputs checked first (both models, the haystack), then the report."""

    source, base_source, tokenizer = resolve_inputs(checkpoint, baseline, allow_pickle)
    haystack = read_text(data, split="test") if data else corpus_text(HAYSTACK)
    protocols = ["query-aware", "context-only"] if protocol == "both" else [protocol]
    model = load_source_model(source, max_memory)
    base_model = None if base_source is None else load_source_model(base_source, max_memory)
    report = passkey_report(model, tokenizer, haystack, lengths, keep, protocols, probe, per_depth,
                            progress=progress, baseline=base_model)
    report["haystack"] = data or f"{HAYSTACK} (offline)"
    if base_source is not None:
        report["baseline_name"] = base_source.name
    return report


def print_passkey(report: dict) -> None:


    click.echo(setting_line(report["setting"]))
    for name, rows in report["results"].items():
        click.echo(f"pass key, {name}: " + ", ".join(f"{k} tokens {v}" for k, v in rows.items() if "@" not in k))
    continuation = report["continuation_perplexity"]
    scores = ", ".join(f"{name} {value:.3f}" for name, value in continuation.items() if isinstance(value, float))
    click.echo(f"perplexity of {continuation['scored_tokens']} tokens after a {continuation['prompt_tokens']}-token "
               f"prompt: {scores}")
