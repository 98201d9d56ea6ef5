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

import random
from dataclasses import dataclass

import torch

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
    filler = tokenizer(haystack, add_special_tokens=False)["input_ids"]
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


@torch.no_grad()
def ask(model, tokenizer, prompt: PasskeyPrompt, protocol: str, budget: float | None, probe: bool = False,
        new_tokens: int = 8) -> bool:
    """One pass-key question under a protocol; budget None or 1 means the full cache."""
    full = torch.cat([prompt.context, prompt.question], dim=1)
    generate = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    compress = budget is not None and budget < 1
    if protocol == "query-aware" or not compress:
        kwargs = {"kv_budget": budget} if compress else {}
        out = model.generate(full, attention_mask=torch.ones_like(full), **generate, **kwargs)
    else:
        probe_ids = tokenizer(PROBE, add_special_tokens=False, return_tensors="pt")["input_ids"] if probe else None
        cache = model.compress_context(prompt.context, kv_budget=budget, probe_ids=probe_ids)
        out = model.generate(full, attention_mask=torch.ones_like(full), past_key_values=cache, **generate)
    return answer_is_right(tokenizer, out[:, full.shape[1]:], prompt.key)


@torch.no_grad()
def compressed_perplexity(model, ids: torch.Tensor, prompt_length: int, budget: float | None) -> float:
    """Perplexity of the tokens after `prompt_length`, read through the prompt's compressed cache."""
    kwargs = {"kv_budget": budget} if budget is not None and budget < 1 else {}
    out = model(ids[:, :prompt_length], use_cache=True, **kwargs)
    rest = model(ids[:, prompt_length:], past_key_values=out.past_key_values, use_cache=True).logits
    logits = torch.cat([out.logits[:, -1:], rest[:, :-1]], dim=1).float()
    targets = ids[:, prompt_length:]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return float(torch.exp(nll))


def passkey_report(model, tokenizer, haystack: str, lengths: list[int], budget: float | None, protocols: list[str],
                   probe: bool = False, per_depth: int = 5, seed: int = 0, progress: bool = True) -> dict:
    """Accuracy per (protocol, length) and per depth, over `per_depth` prompts at each depth."""
    from tqdm.auto import tqdm

    prompts = passkey_prompts(tokenizer, haystack, lengths, per_depth=per_depth, seed=seed)
    results = {}
    for protocol in protocols:
        hits = {}
        for prompt in tqdm(prompts, desc=f"passkey {protocol}", disable=not progress, leave=False):
            right = ask(model, tokenizer, prompt, protocol, budget, probe)
            hits.setdefault(prompt.length, []).append(right)
            hits.setdefault(f"{prompt.length}@{prompt.depth:.0%}", []).append(right)
        results[protocol] = {str(k): f"{sum(v)}/{len(v)}" for k, v in hits.items()}
    stream = torch.tensor([tokenizer(haystack, add_special_tokens=False)["input_ids"][: max(lengths) + 128]])
    ppl = compressed_perplexity(model, stream, max(lengths), budget)
    return {"task": "passkey", "budget": budget, "probe": probe, "results": results,
            "continuation_perplexity": {"prompt_tokens": max(lengths), "scored_tokens": 128, "perplexity": ppl}}
