"""`surgery eval CKPT --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on a converted checkpoint.

The model is built from our own classes (`load_source_model`) and handed to lm-eval's `HFLM` as an object, so no
Python file of the folder ever runs (`trust_remote_code` stays off). A checkpoint whose architecture is the
compression (KVSharer, MatryoshkaKV) runs through HFLM's own batched scoring. For a checkpoint that evicts, a
loglikelihood request is scored as users meet it: the context is prefilled and compressed by the checkpoint's
policy, then the continuation is scored over the compressed cache (`continuation_logits`), one request at a time.
As in `generate()`, the first continuation token is predicted by the prefill itself, before eviction; so a
one-token continuation scores the same with any budget, and the policy acts from the second token on.
Generation tasks go through `generate()`, which compresses each prompt as configured.
"""

from __future__ import annotations

import click
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tqdm.auto import tqdm

from surgery.base.errors import SurgeryError
from surgery.evals.evaluate import continuation_logits, prefill_options
from surgery.checkpoint.loading import load_source_model
from surgery.evals.evaluate import resolve_inputs, setting_of
from surgery.evals.evaluate import setting_line
from surgery.evals.passkey import default_keep


class CompressedContextLM(HFLM):
    """HFLM whose loglikelihoods read the continuation through the context's compressed cache."""

    def __init__(self, *args, keep: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep = keep

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        results = []
        for request, context, continuation in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                                   desc="loglikelihood over compressed contexts"):
            whole = (context + continuation)[-(self.max_length + 1):]  # HFLM's truncation, from the left
            prompt = torch.tensor([whole[:-len(continuation)]], device=self.device)
            targets = torch.tensor([continuation], device=self.device)
            logits, _ = continuation_logits(self.model, prompt, targets, **prefill_options(self.model, self.keep))
            logprobs = torch.log_softmax(logits[0], dim=-1)
            answer = (float(logprobs.gather(-1, targets[0, :, None]).sum()),
                      bool((logits[0].argmax(-1) == targets[0]).all()))
            results.append(answer)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results


def task_manager(include: Path | None) -> TaskManager:
    return TaskManager(include_path=str(include) if include else None)


def check_tasks(manager: TaskManager, tasks: list[str]) -> None:
    """Unknown task names fail before any model loads."""
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise SurgeryError(f"lm-eval has no task {unknown[0]!r}",
                           hint="list them with `lm-eval ls tasks`, or give a folder of task YAMLs with "
                                "--lm-eval-include")


def lm_eval_report(model, tokenizer, tasks: list[str], manager: TaskManager, keep: float | None,
                   limit: int | None, num_fewshot: int | None, batch_size: int) -> dict:
    """lm-eval's metrics per task, for a model in memory; an evicting surgery model scores over compressed
    contexts."""
    evicts = getattr(model.config, "kv_policy", None) is not None
    options = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    lm = CompressedContextLM(**options, keep=keep) if evicts else HFLM(**options)
    output = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                             log_samples=False, bootstrap_iters=1000)
    metrics = {task: {name: value for name, value in values.items() if name != "alias" and value != "N/A"}
               for task, values in output["results"].items()}
    return {"task": "lm-eval", "tasks": metrics, "limit": limit, "num_fewshot": num_fewshot,
            "scoring": "context compressed, continuation scored over the compressed cache" if evicts
            else "lm-eval's HFLM"}


def evaluate_lm_eval(checkpoint: str, tasks: list[str], include: Path | None, keep: float | None,
                     limit: int | None, num_fewshot: int | None, batch_size: int, allow_pickle: bool,
                     max_memory: int | None) -> dict:
    """`surgery eval CKPT --lm-eval TASKS`: the tasks and the checkpoint are checked before anything loads."""

    manager = task_manager(include)
    check_tasks(manager, tasks)
    source, _, tokenizer = resolve_inputs(checkpoint, None, allow_pickle)
    model = load_source_model(source, max_memory).eval()
    keep = default_keep(model, keep)
    report = lm_eval_report(model, tokenizer, tasks, manager, keep, limit, num_fewshot, batch_size)
    report["setting"] = setting_of(model.config, keep)
    return report


def print_lm_eval(report: dict) -> None:


    click.echo(setting_line(report["setting"]))
    for task, metrics in report["tasks"].items():
        shown = ", ".join(f"{name.split(',')[0]} {value:.4f}" for name, value in metrics.items()
                          if isinstance(value, float) and "stderr" not in name)
        click.echo(f"lm-eval {task}: {shown}")
