"""`surgery eval --task retrieval`: the RULER-style suite (retrieval.py) run as users run a model.

Prompts go through `generate()` in left-padded batches. Two protocols, as for the pass key:
- query-aware: the question ends the prompt, so an eviction policy's observation window sees it;
- context-only: the context is compressed before the question is known (`compress_context`), then the question
  is appended to the compressed cache (one prompt at a time: the context's length sets the compression).
A checkpoint that evicts is also run with its full cache on the same prompts, and a baseline, when given, too.
"""

from __future__ import annotations

import click
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from surgery.metrics.cache_keyword import with_cache
from surgery.evals.retrieval import DEFAULT_FORMAT, TASKS, Haystack, RetrievalSample, generate, string_match_recall
from surgery.base.errors import SurgeryError
from surgery.calibrate.corpora import HAYSTACK, corpus_text
from surgery.calibrate.text import read_text
from surgery.checkpoint.loading import load_source_model
from surgery.evals.evaluate import resolve_inputs, setting_of
from surgery.evals.evaluate import setting_line
from surgery.evals.passkey import default_keep

NEW_TOKENS = {"niah_single_uuid": 64, "niah_multivalue": 64, "niah_multiquery": 64, "variable_tracking": 48,
              "common_words": 96, "frequent_words": 40}  # others: 24
DEFAULT_TASKS = ("niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey", "niah_multivalue",
                 "niah_multiquery", "variable_tracking", "common_words", "frequent_words")


def prompt_texts(tokenizer, sample: RetrievalSample, prompt_format: str = DEFAULT_FORMAT) -> tuple[str, str]:
    """(context part, question part) of the prompt in one of `PROMPT_FORMATS`. The context part never holds the
    query, so that a context-only policy compresses it before the question is known."""
    if prompt_format == "qa":
        before, question, reply = "", f"\n\nQuestion: {sample.question}", "Answer:"
    else:
        before, question, reply = sample.preamble + "\n", f"\n{sample.question}", sample.answer_prefix
    if prompt_format == "ruler-plain" or not getattr(tokenizer, "chat_template", None):
        return before + sample.context, question + "\n" + reply
    marker = "\x00QUESTION\x00"
    whole = tokenizer.apply_chat_template([{"role": "user", "content": before + sample.context + marker}],
                                          tokenize=False, add_generation_prompt=True)
    opening, after = whole.split(marker)
    return opening, question + after + reply


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


@torch.no_grad()
def answers(model, tokenizer, samples: list[RetrievalSample], protocol: str, keep: float | None,
            batch_size: int = 4, prompt_format: str = DEFAULT_FORMAT) -> list[str]:
    """Greedy answers to each sample; `keep` None means the model's default, 1 the full cache."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new_tokens = max(NEW_TOKENS.get(sample.task, 24) for sample in samples)
    options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    evicts = getattr(model.config, "kv_policy", None) is not None
    parts = [prompt_texts(tokenizer, sample, prompt_format) for sample in samples]
    texts = []
    if protocol == "context-only" and evicts and (keep is None or keep < 1):
        for context, question in parts:
            context_ids = torch.tensor([encode(tokenizer, context)])
            full = torch.cat([context_ids, torch.tensor([encode(tokenizer, question)])], dim=1)
            cache = model.compress_context(context_ids, kv_budget=keep)
            out = model.generate(full, attention_mask=torch.ones_like(full), **with_cache(cache), **options)
            texts.append(tokenizer.decode(out[0, full.shape[1]:], skip_special_tokens=True))
        return texts
    budget = {"kv_budget": keep} if evicts and keep is not None else {}
    for start in range(0, len(parts), batch_size):
        rows = [encode(tokenizer, context + question) for context, question in parts[start:start + batch_size]]
        ids, mask = left_padded(rows, pad)
        out = model.generate(ids, attention_mask=mask, **options, **budget)
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts


def recall(model, tokenizer, samples: list[RetrievalSample], protocol: str, keep: float | None,
           prompt_format: str = DEFAULT_FORMAT) -> float:
    """Mean string-match recall of the model's greedy answers to `samples`."""
    replies = answers(model, tokenizer, samples, protocol, keep, prompt_format=prompt_format)
    return sum(string_match_recall(r, s.references) for r, s in zip(replies, samples)) / len(samples)


def retrieval_report(model, tokenizer, haystack_text: str, tasks: Iterable[str], lengths: list[int], samples: int,
                     protocols: list[str], keep: float | None, seed: int = 0, baseline=None,
                     progress: bool = True, prompt_format: str = DEFAULT_FORMAT) -> dict:
    """Mean string-match recall per (setting, task, length): the model under each protocol, its full cache when it
    evicts, and the baseline; every setting answers the same prompts."""
    haystack = Haystack(tokenizer, haystack_text)
    evicts = getattr(model.config, "kv_policy", None) is not None
    # a causal gate's flags of context tokens never depend on the question: both protocols are the same run
    alone = "gated" if getattr(model.config, "attention_gate_heads", None) else "full cache"
    settings = [(protocol, model, keep) for protocol in (protocols if evicts else [alone])]
    if evicts:
        settings.append(("full cache", model, 1.0))
    if baseline is not None:
        settings.append(("baseline", baseline, None))
    prompts = {(task, length): generate(task, tokenizer, haystack, length, samples, seed)
               for task in tasks for length in lengths}
    bar = tqdm(total=len(settings) * len(prompts) * samples, desc="retrieval", unit="prompt", disable=not progress)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for name, runner, budget in settings:
        protocol = "query-aware" if name in ("full cache", "baseline", "gated") else name
        for (task, length), batch in prompts.items():
            score = recall(runner, tokenizer, batch, protocol, budget, prompt_format)
            scores.setdefault(name, {}).setdefault(task, {})[str(length)] = round(score, 4)
            bar.update(len(batch))
    bar.close()
    return {"task": "retrieval", "samples": samples, "lengths": lengths, "seed": seed, "prompt_format": prompt_format,
            "scores": scores}


__all__ = ["DEFAULT_TASKS", "TASKS", "answers", "recall", "retrieval_report"]


def evaluate_retrieval(checkpoint: str, baseline: str | None, data: str | None, tasks: list[str], lengths: list[int],
                       samples: int, keep: float | None, protocol: str, seed: int, allow_pickle: bool,
                       max_memory: int | None, progress: bool, prompt_format: str = DEFAULT_FORMAT) -> dict:
    """`surgery eval --task retrieval`: inputs checked first (both models, the task names, the haystack)."""

    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise SurgeryError(f"unknown retrieval task {unknown[0]!r}", hint=f"choose from {', '.join(TASKS)}")
    source, base_source, tokenizer = resolve_inputs(checkpoint, baseline, allow_pickle)
    haystack = read_text(data, split="test") if data else corpus_text(HAYSTACK)
    protocols = ["query-aware", "context-only"] if protocol == "both" else [protocol]
    model = load_source_model(source, max_memory)
    base_model = None if base_source is None else load_source_model(base_source, max_memory)

    keep = default_keep(model, keep)
    report = retrieval_report(model, tokenizer, haystack, tasks, lengths, samples, protocols, keep, seed,
                              base_model, progress, prompt_format)
    report.update(setting=setting_of(model.config, keep), haystack=data or f"{HAYSTACK} (offline)")
    if base_source is not None:
        report["baseline_name"] = base_source.name
    return report


def print_retrieval(report: dict) -> None:


    click.echo(setting_line(report["setting"]))
    lengths = [str(length) for length in report["lengths"]]
    click.echo(f"{'string-match recall':32s} " + " ".join(f"{length + ' tok':>10s}" for length in lengths))
    for name, tasks in report["scores"].items():
        for task, row in tasks.items():
            click.echo(f"{name + ', ' + task:32s} " + " ".join(f"{row[length]:>10.0%}" for length in lengths))
