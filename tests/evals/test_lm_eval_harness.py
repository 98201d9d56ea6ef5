"""`surgery eval --lm-eval`: lm-evaluation-harness on a converted checkpoint, offline on a local task."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from helpers import assert_clean_failure, cli, run_convert
from conftest import read_json

lm_eval = pytest.importorskip("lm_eval")  # an optional extra; `make install` installs it

from surgery.evals.harness import CompressedContextLM, lm_eval_report, task_manager  # noqa: E402
from surgery.checkpoint.loading import load_source_model  # noqa: E402
from surgery.checkpoint.sources import resolve  # noqa: E402

LOCAL_TASKS = Path(__file__).parents[1] / "data" / "lm_eval"
TASK = "surgery_local"


@pytest.fixture(autouse=True)
def offline_in_task_folder(monkeypatch):
    """The task's JSONL is named relative to its folder; nothing may reach the Hub."""
    monkeypatch.chdir(LOCAL_TASKS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def manager():
    return task_manager(LOCAL_TASKS)


def sample_loglikelihoods(lm, manager, **options) -> tuple[float, list[float]]:
    """Accuracy and every (document, choice) loglikelihood lm-eval computed."""
    output = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, log_samples=True,
                                     bootstrap_iters=0, **options)
    samples = output["samples"][TASK]
    return output["results"][TASK]["acc,none"], [float(r[0][0]) for s in samples for r in s["resps"]]


def stock_lm(folder: Path):
    from lm_eval.models.huggingface import HFLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), batch_size=4)


def test_identity_checkpoint_scores_as_stock_transformers(tiny_with_tokenizer, tmp_path, manager):
    """Through the CLI, the identity checkpoint's accuracy (and every loglikelihood) equals the source model's
    under stock transformers and lm-eval's own HFLM."""
    checkpoint = run_convert(tiny_with_tokenizer, tmp_path / "identity", recipe="none")
    result = cli("eval", checkpoint, "--lm-eval", TASK, "--lm-eval-include", LOCAL_TASKS, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    ours = read_json(checkpoint / "eval_results.json")["lm-eval"]
    stock_accuracy, stock_scores = sample_loglikelihoods(stock_lm(tiny_with_tokenizer), manager)
    assert ours["tasks"][TASK]["acc,none"] == stock_accuracy
    assert f"lm-eval {TASK}: acc {stock_accuracy:.4f}" in result.output
    assert f"| {TASK} | acc | {stock_accuracy:.4f} ± " in (checkpoint / "README.md").read_text()  # the card

    model = load_source_model(resolve(str(checkpoint)))
    report = lm_eval_report(model, AutoTokenizer.from_pretrained(checkpoint), [TASK], manager, None, None, None, 4)
    assert report["tasks"][TASK]["acc,none"] == stock_accuracy
    from lm_eval.models.huggingface import HFLM

    _, surgery_scores = sample_loglikelihoods(HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(checkpoint),
                                                   batch_size=4), manager)
    assert surgery_scores == pytest.approx(stock_scores, abs=1e-4)


@pytest.fixture(scope="module")
def evicting_checkpoint(tiny_with_tokenizer, tmp_path_factory) -> Path:
    """SnapKV keeping 30% of every prompt, however short, with a 4-token observation window."""
    return run_convert(tiny_with_tokenizer, tmp_path_factory.mktemp("snap") / "snapkv", recipe="snapkv",
                       recipe_options={"keep": 0.3, "keep_at_least": 0, "window": 4})


def test_evicting_checkpoint_scores_over_the_compressed_context(evicting_checkpoint, tiny_with_tokenizer, manager):
    """With the full cache kept, the compressed-context scorer equals stock lm-eval on the source model; at the
    checkpoint's 30% the loglikelihoods change, so the policy acts on the context."""
    model = load_source_model(resolve(str(evicting_checkpoint)))
    tokenizer = AutoTokenizer.from_pretrained(evicting_checkpoint)
    _, stock = sample_loglikelihoods(stock_lm(tiny_with_tokenizer), manager, num_fewshot=3)
    _, full = sample_loglikelihoods(CompressedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=1, keep=1.0),
                                    manager, num_fewshot=3)
    _, compressed = sample_loglikelihoods(CompressedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=1,
                                                              keep=0.3), manager, num_fewshot=3)
    assert full == pytest.approx(stock, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(compressed, stock)) > 1e-3


def test_lm_eval_bad_input(tiny_checkpoint, monkeypatch):
    assert_clean_failure(cli("eval", tiny_checkpoint, "--lm-eval", "no_such_task_xyz", "--lm-eval-include",
                             LOCAL_TASKS), "no_such_task_xyz")
    assert_clean_failure(cli("eval", tiny_checkpoint, "--lm-eval", " , "), "--lm-eval")
    assert_clean_failure(cli("eval", tiny_checkpoint, "--task", "passkey", "--lm-eval", TASK), "--lm-eval")
    assert_clean_failure(cli("eval", tiny_checkpoint, "--lm-eval", TASK, "--lm-eval-include", "/no/such/folder"),
                         "--lm-eval-include")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert_clean_failure(cli("eval", tiny_checkpoint, "--lm-eval", TASK), "surgery[lm-eval]")
