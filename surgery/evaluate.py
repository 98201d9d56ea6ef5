"""`surgery eval`: perplexity, measured KV bytes, greedy agreement, speed and memory against a baseline."""

import json
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
from tqdm.auto import tqdm

from .calibration import heldout_text, read_text
from .card import METRICS
from .errors import SurgeryError
from .loading import check_same_vocabulary, load_source_model, load_tokenizer
from .sources import resolve

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    data: str | None = None
    max_tokens: int = 4096
    window: int = 512
    stride: int = 256
    agreement_prompts: int = 4
    agreement_prompt_len: int = 64
    agreement_new_tokens: int = 32
    speed_context: int = 512
    decode_tokens: int = 32


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
    what sharing, projection or eviction removed is simply absent from the tensors."""
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
    return cache_kv_bytes_per_token(model(ids, use_cache=True, **forward_kwargs).past_key_values)


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
def speed(model, ids: torch.Tensor, decode_tokens: int) -> dict[str, float]:
    """Prefill tokens/s over `ids`, then greedy decode tokens/s with the cache at that context length."""
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill_s = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    decode_s = time.perf_counter() - start
    return {"prefill_tokens_per_s": ids.numel() / prefill_s, "decode_tokens_per_s": decode_tokens / decode_s}


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure(model, text_ids: torch.Tensor, settings: EvalSettings, progress: bool) -> dict[str, float]:
    steps = tqdm(total=3, desc="eval", disable=not progress, leave=False)
    result = {"perplexity": perplexity(model, text_ids, settings.window, settings.stride)}
    steps.update()
    result["kv_bytes_per_token"] = kv_bytes_per_token(model, text_ids[:, : settings.speed_context])
    steps.update()
    result.update(speed(model, text_ids[:, : settings.speed_context], settings.decode_tokens))
    result["peak_memory_mib"] = peak_memory_mib()
    steps.update()
    steps.close()
    return result


def evaluate(checkpoint: str | Path, baseline: str | None = None, progress: bool = True, allow_pickle: bool = False,
             max_memory: int | None = None, **options: Any) -> dict[str, Any]:
    """Measure `checkpoint`, and `baseline` on the same tokens when given. Both are resolved and their
    vocabularies compared before anything runs, so a bad baseline fails at once. `max_memory` (bytes) bounds the
    resident weights of each model: the rest is offloaded to disk and read layer by layer."""
    settings = EvalSettings(**options)
    source = resolve(str(checkpoint), allow_pickle=allow_pickle)
    base_source = None if baseline is None else resolve(baseline, allow_pickle=allow_pickle)
    if base_source is not None:
        check_same_vocabulary(source, base_source, "baseline")
    model, tokenizer = load_source_model(source, max_memory), load_tokenizer(source.folder)
    if tokenizer is None:
        raise SurgeryError(f"{checkpoint} has no tokenizer to read the eval text", hint="add its tokenizer files")
    text = heldout_text() if settings.data is None else read_text(settings.data, split="test")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][: settings.max_tokens]])
    if ids.shape[1] < settings.speed_context:
        raise SurgeryError(f"eval text has only {ids.shape[1]} tokens", hint=f"give at least {settings.speed_context}")
    note = f"{ids.shape[1]} held-out tokens, window {settings.window}, stride {settings.stride}, fp32, " + (
        "CUDA" if torch.cuda.is_available() else "CPU")

    results = {"settings": asdict(settings), "note": note}
    results["model"] = measure(model, ids, settings, progress)  # first, so its peak memory excludes the baseline
    if baseline is not None:
        base_model = load_source_model(base_source, max_memory)
        step = ids.shape[1] // settings.agreement_prompts
        prompts = torch.cat([ids[:, i * step : i * step + settings.agreement_prompt_len]
                             for i in range(settings.agreement_prompts)])
        sequences = greedy_continuations(base_model, prompts, settings.agreement_new_tokens)
        results["baseline"] = measure(base_model, ids, settings, progress)
        results["baseline"]["greedy_agreement"] = 1.0
        results["model"]["greedy_agreement"] = greedy_agreement(model, sequences, settings.agreement_prompt_len)
        del base_model
    if baseline is not None:
        base_kv, kv = results["baseline"]["kv_bytes_per_token"], results["model"]["kv_bytes_per_token"]
        results["kv_bytes_saved"] = 1 - kv / base_kv
    return results


def print_report(results: dict[str, Any]) -> None:
    candidate, baseline = results["model"], results.get("baseline", {})
    click.echo(f"{'metric':40s} {'model':>14s} {'baseline':>14s}")
    for key, label, fmt in METRICS:
        if key in candidate:
            base = fmt.format(baseline[key]) if key in baseline else "-"
            click.echo(f"{label:40s} {fmt.format(candidate[key]):>14s} {base:>14s}")
    if "kv_bytes_saved" in results:
        click.echo(f"{'KV-cache bytes saved':40s} {results['kv_bytes_saved']:>14.1%}")
    click.echo(results["note"])


def write_results(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")
