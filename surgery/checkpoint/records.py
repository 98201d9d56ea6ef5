"""The files a checkpoint carries besides its weights, as formats: recipe.yaml (what was done, replayable) and
eval_results.json (what `surgery eval` measured). They live low in the ladder so that the card, push and replay
read them without importing what computes them."""

import json
from pathlib import Path
from typing import Any

import yaml

from surgery.base.errors import SurgeryError, first_line

RECIPE_FILE = "recipe.yaml"
EVAL_FILE = "eval_results.json"
TASKS = ("quality", "passkey", "retrieval", "lm-eval")


def write_recipe(folder: Path, record: dict[str, Any]) -> None:
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(record, sort_keys=False, width=120))


def read_recipe(folder: Path) -> dict[str, Any]:
    """The checkpoint's recipe.yaml as a dict; {} when there is none."""
    path = Path(folder) / RECIPE_FILE
    return load_recipe_file(path) if path.is_file() else {}


def load_recipe_file(path: Path) -> dict[str, Any]:
    """A recipe.yaml as a dict; one line when it is not a readable YAML mapping."""
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SurgeryError(f"{path} is not valid YAML: {first_line(error)}", hint="re-export the checkpoint") from None
    if not isinstance(record, dict):
        raise SurgeryError(f"{path} is not a YAML mapping", hint="re-export the checkpoint")
    return record


METRICS = (
    ("perplexity", "perplexity (held-out)", "{:.3f}"),
    ("kv_bytes_per_token", "KV-cache bytes per token (measured)", "{:,.0f}"),
    ("tokens_kept", "tokens kept per layer and KV head", "{:.1%}"),
    ("tokens_skipped", "tokens skipping each routed layer", "{:.1%}"),
    ("experts_per_token", "true experts per token (measured)", "{:.2f}"),
    ("mlp_flops_per_token", "MLP FLOPs per token", "{:,.0f}"),
    ("flops_per_token", "projection and MLP FLOPs per token", "{:,.0f}"),
    ("greedy_agreement", "greedy agreement with base", "{:.1%}"),
    ("prefill_tokens_per_s", "prefill tokens/s", "{:.1f}"),
    ("decode_tokens_per_s", "decode tokens/s", "{:.1f}"),
    ("peak_memory_mib", "peak memory (MiB)", "{:.0f}"),
)


def read_results(path: Path) -> dict[str, Any]:
    """eval_results.json: one entry per task ("quality", "passkey"); {} when absent or unreadable."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def write_results(results: dict[str, Any], path: Path) -> None:
    """Add this task's results to the file, keeping the other tasks' (a passkey run keeps the quality numbers)."""
    merged = {task: value for task, value in read_results(path).items() if task in TASKS}
    merged[results.get("task", "quality")] = results
    Path(path).write_text(json.dumps(merged, indent=2) + "\n")


def default_results_path(checkpoint: str | Path) -> Path:
    """CHECKPOINT/eval_results.json for a local folder, else ./eval_results.json."""
    folder = Path(checkpoint)
    return (folder if folder.is_dir() else Path.cwd()) / EVAL_FILE
