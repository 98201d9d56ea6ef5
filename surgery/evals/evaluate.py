"""`surgery eval`: perplexity, measured KV bytes, greedy agreement, speed and memory against a baseline."""

import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import torch
from tqdm.auto import tqdm

from surgery.metrics.cache_keyword import cache_of, with_cache
from surgery.calibrate.text import heldout_text, read_text
from surgery.checkpoint.records import METRICS
from surgery.metrics.compute import measured_compute, reset_counts
from surgery.base.intervals import (perplexity_interval, perplexity_of, perplexity_ratio_interval, share_interval,
                                      verdict)
from surgery.base.errors import SurgeryError
from surgery.checkpoint.loading import check_same_vocabulary, load_source_model, load_tokenizer, read_checkpoint_config
from surgery.checkpoint.sources import resolve

log = logging.getLogger(__name__)

COMPUTE_KEYS = ("tokens_skipped", "experts_per_token", "mlp_flops_per_token", "flops_per_token")  # measured, when counted


@dataclass
class EvalSettings:
    """What `surgery eval` measures on. Quality runs as `generate` uses the model: each segment's prompt of
    `prompt_len` tokens goes through the cache (where an eviction policy compresses it), and the next
    `score_tokens` are scored, or greedily continued, from that cache."""

    data: str | None = None
    segments: int = 4
    prompt_len: int = 1024
    score_tokens: int = 128
    agreement_new_tokens: int = 32
    speed_context: int = 512
    decode_tokens: int = 32
    keep: float | None = None  # the checkpoint's eviction budget unless given (1: the full cache)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, stride: int) -> float:
    """Strided sliding-window perplexity: each token is scored once, with up to `window` tokens of context."""
    nll_sum, count, previous_end = 0.0, 0, 0
    length = ids.shape[1]
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        target_len = end - previous_end
        chunk = ids[:, begin:end]
        logits = model(chunk, use_cache=False).logits[:, -target_len:-1] if target_len > 1 else None
        targets = chunk[:, -target_len + 1:]
        if logits is not None:
            nll_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            count += targets.numel()
        previous_end = end
        if end == length:
            break
    return float(torch.exp(torch.tensor(nll_sum / count)))


def cache_kv_bytes_per_token(cache) -> float:
    """Bytes of every K/V tensor the cache holds per token seen (batch × sequence), for any transformers Cache:
    what sharing, projection or eviction removed is simply absent from the tensors. A surgery cache counts its
    own tensors (PoD's proximal key store is neither `keys` nor `values`)."""
    if hasattr(cache, "kv_bytes_per_token"):
        return cache.kv_bytes_per_token()
    total, batch = 0, 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                total += tensor.numel() * tensor.element_size()
                batch = tensor.shape[0]
    tokens = batch * cache.get_seq_length()
    return total / tokens if tokens else 0.0


@torch.no_grad()
def kv_bytes_per_token(model, ids: torch.Tensor, **forward_kwargs) -> float:
    return cache_kv_bytes_per_token(cache_of(model(ids, use_cache=True, **forward_kwargs)))


@torch.no_grad()
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


@torch.no_grad()
def greedy_agreement(model, sequences: torch.Tensor, prompt_len: int) -> float:
    """Share of the baseline's greedy tokens that this model also picks greedily, given the same history."""
    predictions = model(sequences[:, :-1], use_cache=False).logits.argmax(-1)[:, prompt_len - 1:]
    return (predictions == sequences[:, prompt_len:]).float().mean().item()


@torch.no_grad()
def continuation_logits(model, prompt: torch.Tensor, continuation: torch.Tensor, **prefill: Any):
    """The logits that predict each `continuation` token, read through the cache of `prompt` (compressed by the
    model's policy at prefill, as in `generate`), and the cache after the continuation."""
    out = model(prompt, use_cache=True, **prefill)
    rest = model(continuation, use_cache=True, **with_cache(cache_of(out)))
    return torch.cat([out.logits[:, -1:], rest.logits[:, :-1]], dim=1).float(), cache_of(rest)


def prefill_options(model, keep: float | None) -> dict[str, float]:
    """`kv_budget` for a surgery model when eval overrides its keep fraction; nothing for other models."""
    if keep is None or getattr(model.config, "model_type", None) != "surgery":
        return {}
    return {"kv_budget": keep}


def eval_segments(ids: torch.Tensor, settings: EvalSettings) -> list[torch.Tensor]:
    """`segments` windows of prompt + scored tokens, evenly spread over the held-out token stream."""
    length = settings.prompt_len + settings.score_tokens
    if ids.shape[1] < length:
        raise SurgeryError(f"the eval text has {ids.shape[1]} tokens, fewer than one segment ({length})",
                           hint="give more --data, or lower --prompt-len")
    spread = (ids.shape[1] - length) // max(settings.segments - 1, 1)
    return [ids[:, i * spread : i * spread + length] for i in range(settings.segments)]


def compressed_quality(model, segments: list[torch.Tensor], settings: EvalSettings) -> dict[str, float]:
    """Perplexity of the scored tokens after each compressed prompt, and the KV bytes per token the cache holds
    at the end (prompt + scored tokens), averaged over segments."""
    nll, count, kv_bytes, kept = [], [], [], []
    reset_counts(model)
    for segment in segments:
        prompt, targets = segment[:, : settings.prompt_len], segment[:, settings.prompt_len:]
        logits, cache = continuation_logits(model, prompt, targets, **prefill_options(model, settings.keep))
        nll.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item())
        count.append(targets.numel())
        kv_bytes.append(cache_kv_bytes_per_token(cache))
        kept.append(cache.kept_fraction() if hasattr(cache, "kept_fraction") else 1.0)
    compute = measured_compute(model) or {}
    return {"perplexity": perplexity_of(nll, count), "perplexity_interval": list(perplexity_interval(nll, count)),
            "segment_nll": nll, "segment_tokens": count,
            "kv_bytes_per_token": sum(kv_bytes) / len(kv_bytes), "tokens_kept": sum(kept) / len(kept),
            **{key: compute[key] for key in COMPUTE_KEYS if key in compute}}


@torch.no_grad()
def baseline_continuations(baseline, segments: list[torch.Tensor], settings: EvalSettings) -> list[torch.Tensor]:
    """The baseline's greedy continuation of each prompt, with its full cache."""
    prompts = [segment[:, : settings.prompt_len] for segment in segments]
    return [greedy_continuations(baseline, prompt, settings.agreement_new_tokens)[:, prompt.shape[1]:]
            for prompt in prompts]


def compressed_agreement(model, segments: list[torch.Tensor], continuations: list[torch.Tensor],
                         settings: EvalSettings) -> tuple[float, tuple[float, float]]:
    """Share of the baseline's greedy tokens this model also picks, reading the same history through its
    compressed prompt, and its 95% interval over segments."""
    hits, totals = [], []
    for segment, continuation in zip(segments, continuations):
        logits, _ = continuation_logits(model, segment[:, : settings.prompt_len], continuation,
                                        **prefill_options(model, settings.keep))
        hits.append((logits.argmax(-1) == continuation).sum().item())
        totals.append(continuation.numel())
    return sum(hits) / sum(totals), share_interval(hits, totals)


@torch.no_grad()
def timed_decode(model, ids: torch.Tensor, decode_tokens: int,
                 after_prefill: Callable[[Any], Any] | None = None) -> tuple[float, float, Any]:
    """Seconds to prefill `ids`, seconds for `decode_tokens` greedy steps after it, and what `after_prefill` read
    from the cache between the two (untimed; the decode steps then grow that cache)."""
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill_s = time.perf_counter() - start
    cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
    read = after_prefill(cache) if after_prefill is not None else None
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(token, use_cache=True, **with_cache(cache))
        cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
    return prefill_s, time.perf_counter() - start, read


def speed(model, ids: torch.Tensor, decode_tokens: int) -> dict[str, float]:
    """Prefill tokens/s over `ids`, then greedy decode tokens/s with the cache at that context length."""
    prefill_s, decode_s, _ = timed_decode(model, ids, decode_tokens)
    return {"prefill_tokens_per_s": ids.numel() / prefill_s, "decode_tokens_per_s": decode_tokens / decode_s}


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure(model, ids: torch.Tensor, segments: list[torch.Tensor], settings: EvalSettings,
            progress: bool) -> dict[str, float]:
    steps = tqdm(total=2, desc="eval", disable=not progress, leave=False)
    result = compressed_quality(model, segments, settings)
    steps.update()
    result.update(speed(model, ids[:, : settings.speed_context], settings.decode_tokens))
    result["peak_memory_mib"] = peak_memory_mib()
    steps.update()
    steps.close()
    return result


def setting_of(config, keep: float | None) -> dict[str, Any]:
    """The compression a model ran with, which the report states next to the numbers."""
    if getattr(config, "model_type", None) != "surgery":
        return {"recipes": [], "kv_policy": None, "keep": None}
    if config.kv_policy is None:
        kept = None
    elif keep is not None or config.kv_budget_tokens is None:
        kept = f"{keep if keep is not None else config.kv_budget:.0%} of each prompt"
    else:
        kept = f"{config.kv_budget_tokens} tokens of each prompt"
    return {"recipes": list(config.surgery_recipes or []), "kv_policy": config.kv_policy, "keep": kept}


def resolve_inputs(checkpoint: str | Path, baseline: str | None, allow_pickle: bool):
    """(source, baseline source or None, tokenizer): both models resolved, their vocabularies compared and the
    tokenizer loaded, before any weights are read."""
    source = resolve(str(checkpoint), allow_pickle=allow_pickle)
    base_source = None if baseline is None else resolve(baseline, allow_pickle=allow_pickle)
    for checked in (source, base_source):
        if checked is not None and checked.model_type == "surgery":
            read_checkpoint_config(checked.folder)  # a bad surgery config.json fails here, in one line
    if base_source is not None:
        check_same_vocabulary(source, base_source, "baseline")
    tokenizer = load_tokenizer(source.folder)
    if tokenizer is None:
        raise SurgeryError(f"{checkpoint} has no tokenizer to read text with", hint="add its tokenizer files")
    return source, base_source, tokenizer


def setting_line(setting: dict[str, Any]) -> str:
    """"setting: snapkv (snapkv keeps 30% of each prompt)", printed with every task's numbers."""
    keep = f" ({setting['kv_policy']} keeps {setting['keep']})" if setting.get("keep") else ""
    return f"setting: {', '.join(setting.get('recipes') or []) or 'no recipe'}{keep}"


def evaluate(checkpoint: str | Path, baseline: str | None = None, progress: bool = True, allow_pickle: bool = False,
             max_memory: int | None = None, **options: Any) -> dict[str, Any]:
    """Measure `checkpoint`, and `baseline` on the same segments when given. Every input (both models, their
    vocabularies, the text) is resolved and checked before a model loads, so a bad one fails at once.
    `max_memory` (bytes) bounds the resident weights of each model: the rest is offloaded to disk."""
    settings = EvalSettings(**options)
    source, base_source, tokenizer = resolve_inputs(checkpoint, baseline, allow_pickle)
    text = heldout_text() if settings.data is None else read_text(settings.data, split="test")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]])
    segments = eval_segments(ids, settings)
    if ids.shape[1] < settings.speed_context:
        raise SurgeryError(f"eval text has only {ids.shape[1]} tokens", hint=f"give at least {settings.speed_context}")
    data = "python-reference (offline)" if settings.data is None else settings.data
    note = (f"{data}: {len(segments)} prompts of {settings.prompt_len} tokens, each compressed as generate() does, "
            f"then {settings.score_tokens} tokens scored and {settings.agreement_new_tokens} greedy tokens compared "
            f"through that cache; fp32, " + ("CUDA" if torch.cuda.is_available() else "CPU"))

    model = load_source_model(source, max_memory)
    results = {"task": "quality", "settings": asdict(settings), "note": note,
               "setting": setting_of(model.config, settings.keep)}
    results["model"] = measure(model, ids, segments, settings, progress)  # first: its peak excludes the baseline
    if getattr(model.config, "kv_policy", None) is not None and settings.keep != 1.0:
        results["full_cache"] = compressed_quality(model, segments, replace(settings, keep=1.0))
    if base_source is not None:
        base_model = load_source_model(base_source, max_memory)
        continuations = baseline_continuations(base_model, segments, settings)
        results["baseline"] = measure(base_model, ids, segments, settings, progress)
        results["baseline"]["greedy_agreement"] = 1.0
        results["baseline_name"] = base_source.name
        del base_model
        agreement, interval = compressed_agreement(model, segments, continuations, settings)
        results["model"]["greedy_agreement"], results["model"]["greedy_agreement_interval"] = agreement, list(interval)
        base_kv, kv = results["baseline"]["kv_bytes_per_token"], results["model"]["kv_bytes_per_token"]
        results["kv_bytes_saved"] = 1 - kv / base_kv
        ratio = perplexity_ratio_interval(results["model"]["segment_nll"], results["baseline"]["segment_nll"],
                                          results["model"]["segment_tokens"])
        results["perplexity_ratio"] = {"value": results["model"]["perplexity"] / results["baseline"]["perplexity"],
                                       "interval": list(ratio), "verdict": verdict(ratio)}
    return results


def print_report(results: dict[str, Any]) -> None:
    candidate, baseline, full = results["model"], results.get("baseline", {}), results.get("full_cache", {})
    click.echo(f"{'metric':40s} {'model':>14s} {'baseline':>14s}" + (f" {'full cache':>14s}" if full else ""))
    for key, label, fmt in METRICS:
        if key in candidate:
            base = fmt.format(baseline[key]) if key in baseline else "-"
            same_model = (f" {fmt.format(full[key]) if key in full else '-':>14s}") if full else ""
            click.echo(f"{label:40s} {fmt.format(candidate[key]):>14s} {base:>14s}{same_model}")
    if "kv_bytes_saved" in results:
        click.echo(f"{'KV-cache bytes saved':40s} {results['kv_bytes_saved']:>14.1%}")
    if "perplexity_interval" in candidate:
        low, high = candidate["perplexity_interval"]
        click.echo(f"{'perplexity, 95% interval over segments':40s} {f'{low:.3f}–{high:.3f}':>14s}")
    if "perplexity_ratio" in results:
        ratio = results["perplexity_ratio"]
        low, high = ratio["interval"]
        click.echo(f"{'perplexity / baseline (paired, 95%)':40s} {ratio['value']:>14.3f} ({low:.3f}–{high:.3f}: "
                   f"{ratio['verdict']})")
    click.echo(setting_line(results.get("setting") or {}))
    click.echo(results["note"])


QUICK_CHECK = dict(segments=1, prompt_len=512, score_tokens=64, agreement_new_tokens=32, speed_context=64,
                   decode_tokens=1)
FAR_AGREEMENT, FAR_PERPLEXITY = 0.5, 2.0


def far_from_source(results: dict[str, Any], recipes: list) -> str | None:
    """One line when the converted model is far from its source (agreement under 50% or perplexity over 2×),
    naming the milder settings to try; None when it is close, or when there was no baseline."""
    model, base = results.get("model", {}), results.get("baseline")
    if not base:
        return None
    problems = []
    if model.get("greedy_agreement", 1.0) < FAR_AGREEMENT:
        problems.append(f"greedy agreement {model['greedy_agreement']:.0%}")
    if model["perplexity"] > FAR_PERPLEXITY * base["perplexity"]:
        problems.append(f"perplexity {model['perplexity']:.1f} against {base['perplexity']:.1f}")
    if not problems:
        return None
    milder = "; ".join(f"{recipe.name}: {recipe.milder}" for recipe in recipes if recipe.milder)
    return f"the converted model is far from its source ({', '.join(problems)}); try {milder or 'another recipe'}"


def quick_check(folder: Path, source_folder: Path, recipes: list, progress: bool = False) -> str | None:
    """A short eval against the source (one 512-token prompt, compressed as generate() does) after a conversion
    that did not ask for --eval; the far_from_source warning, or None."""
    results = evaluate(folder, str(source_folder), progress=progress, **QUICK_CHECK)
    return far_from_source(results, recipes)
