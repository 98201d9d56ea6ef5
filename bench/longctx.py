"""What the long-context benchmarks share: held-out windows scored after their prompt went through the cache, and
single-needle prompts, at 2k-4k on the demo model. Offline."""

import math
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from surgery.calibrate.text import heldout_text
from surgery.calibrate.corpora import HAYSTACK, corpus_text
from surgery.evals.evaluate import cache_kv_bytes_per_token, continuation_logits
from surgery.evals.retrieval import Haystack, generate

SCORED = 256  # tokens scored after each prompt of LENGTH − SCORED
SEGMENTS = 2  # held-out windows per length
TASK = "niah_single_number"


def held_out_windows(tokenizer, lengths: list[int]) -> dict[int, list[torch.Tensor]]:
    """SEGMENTS consecutive windows per length of Python's reference manual prose, which no calibration reads."""
    stream = torch.tensor([tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]])
    return {length: [stream[:, i * length : (i + 1) * length] for i in range(SEGMENTS)] for length in lengths}


def needle_prompts(tokenizer, lengths: list[int], samples: int) -> dict[int, list]:
    haystack = Haystack(tokenizer, corpus_text(HAYSTACK))
    return {length: generate(TASK, tokenizer, haystack, length, samples, 0) for length in lengths}


@torch.no_grad()
def scored_windows(model, segments: list[torch.Tensor], **prefill):
    """Yield (nll sum, tokens scored, cache) per window: its last SCORED tokens scored after the prompt went
    through the cache (compressed as generate() does)."""
    for segment in segments:
        prompt, targets = segment[:, :-SCORED], segment[:, -SCORED:]
        logits, cache = continuation_logits(model, prompt, targets, **prefill)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        yield nll, targets.numel(), cache


def window_quality(model, segments: list[torch.Tensor], **prefill) -> tuple[float, float, list]:
    """(perplexity, mean measured KV bytes per token, the caches) over the windows of one length."""
    nll, count, kv, caches = 0.0, 0, [], []
    for window_nll, window_count, cache in scored_windows(model, segments, **prefill):
        nll, count = nll + window_nll, count + window_count
        kv.append(cache_kv_bytes_per_token(cache))
        caches.append(cache)
    return math.exp(nll / count), sum(kv) / len(kv), caches


METHOD = (f"- Perplexity: {SEGMENTS} windows per length of Python's reference manual prose (`pydoc_data.topics`, "
          f"which calibration and training never saw); each window's first L − {SCORED} tokens go through the cache "
          f"(compressed as generate() does), the last {SCORED} are scored.")


@contextmanager
def work_folder(keep: Path | None, prefix: str):
    """Where a benchmark writes its checkpoints: `keep` (kept afterwards, so a later run can resume), else a
    temporary folder removed at the end."""
    work = keep or Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
