"""recipe.yaml and the model card (README.md) of a converted checkpoint."""

import json
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from surgery.checkpoint.records import EVAL_FILE, METRICS, read_recipe, read_results
from surgery.base.intervals import share_with_interval

TEMPLATE = Path(__file__).parent.parent / "templates" / "model_card.md"


def _with_interval(values: dict[str, Any], key: str, fmt: str) -> str:
    """A metric and, where eval measured one, its 95% interval: "12.345 (11.9–12.8)"."""
    text = fmt.format(values[key])
    interval = values.get(f"{key}_interval")
    if interval:
        text += f" ({fmt.format(interval[0])}–{fmt.format(interval[1])})"
    return text


def _eval_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    candidate, baseline = results.get("model", {}), results.get("baseline", {})
    for key, label, fmt in METRICS:
        if key in candidate:
            base = _with_interval(baseline, key, fmt) if key in baseline else "-"
            rows.append((label, _with_interval(candidate, key, fmt), base))
    ratio = results.get("perplexity_ratio")
    if ratio:
        low, high = ratio["interval"]
        rows.append(("perplexity / base model, paired over segments", f"{ratio['value']:.3f} ({low:.3f}–{high:.3f}): "
                     f"{ratio['verdict']}", "1"))
    return rows


def _passkey_table(report: dict[str, Any] | None) -> dict[str, Any]:
    """Lengths and one row of "hits/prompts" per protocol, for the card."""
    results = (report or {}).get("results") or {}
    lengths = [key for key in next(iter(results.values()), {}) if "@" not in key]
    rows = [(name, [row.get(length, "-") for length in lengths]) for name, row in results.items()]
    return {"passkey_lengths": lengths, "passkey_rows": rows}


def _retrieval_table(report: dict[str, Any] | None) -> dict[str, Any]:
    """Mean string-match recall over the tasks, per setting and length, for the card."""
    scores = (report or {}).get("scores") or {}
    lengths = [str(length) for length in (report or {}).get("lengths", [])]
    rows, samples = [], (report or {}).get("samples") or 0
    for name, tasks in scores.items():
        means = [sum(row[length] for row in tasks.values()) / len(tasks) for length in lengths]
        trials = samples * len(tasks)  # one prompt, one trial: the Wilson interval of the pooled recall
        rows.append((name, [share_with_interval(mean, trials) for mean in means]))
    return {"retrieval_lengths": lengths, "retrieval_rows": rows,
            "retrieval_tasks": ", ".join(next(iter(scores.values()), {})), "retrieval_samples": (report or {}).get("samples")}


def _lm_eval_rows(report: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(task, metric, value ± stderr) for each lm-eval metric, for the card."""
    rows = []
    for task, metrics in ((report or {}).get("tasks") or {}).items():
        for name, value in metrics.items():
            if "stderr" in name or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(name.replace(",", "_stderr,", 1))
            spread = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            rows.append((task, name.split(",")[0], f"{value:.4f}{spread}"))
    return rows


def _model_index(results: dict[str, Any]) -> list[EvalResult]:
    """`model-index` entries for the Hub from `surgery eval` results."""
    candidate = results.get("model", {})
    metrics = [("perplexity", "perplexity"), ("kv_bytes_per_token", "kv_bytes_per_token"),
               ("greedy_agreement", "greedy_agreement")]
    return [EvalResult(task_type="text-generation", dataset_type="pydoc_data.topics",
                       dataset_name="Python reference manual (held-out)", metric_type=metric,
                       metric_value=round(float(candidate[key]), 4))
            for key, metric in metrics if key in candidate]


def render_card(folder: Path, model_id: str | None = None) -> str:
    """Render README.md from templates/ with the recipe record and, when present, the eval results."""
    folder = Path(folder)
    record = read_recipe(folder)
    all_results = read_results(folder / EVAL_FILE)
    results = all_results.get("quality", {})
    recipes = []
    for entry in record.get("recipes") or []:  # convert wrote what each recipe is and did beside its plan
        recipes.append({
            "name": entry["name"],
            "paper": entry.get("paper", "-"),
            "saves": entry.get("saves", "-"),
            "options": entry.get("options", {}),
            "plan_lines": entry.get("summary", []),
        })
    source = record.get("source") or {}
    base_model = source.get("name", "unknown")
    model_name = f"{base_model.split('/')[-1]} ({', '.join(r['name'] for r in recipes)})"
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="finetune" if record.get("adapt") else None,  # nothing else fits an untrained conversion
        license=source.get("license"),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["surgery", *[entry["name"] for entry in record.get("recipes", [])]],
        model_name=model_name,
        eval_results=_model_index(results) or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        model_id=model_id or str(folder),
        base_model=base_model,
        source_model=source.get("model") or base_model,
        gguf=source.get("gguf"),
        weights_dtype=(record.get("export") or {}).get("dtype", "float32"),
        setting=results.get("setting") or {},
        passkey=all_results.get("passkey"),
        **_passkey_table(all_results.get("passkey")),
        **_retrieval_table(all_results.get("retrieval")),
        retrieval_format=(all_results.get("retrieval") or {}).get("prompt_format", "qa"),
        lm_eval=all_results.get("lm-eval"),
        lm_eval_rows=_lm_eval_rows(all_results.get("lm-eval")),
        recipes=recipes,
        family=_plain_family(folder),
        eval_rows=_eval_rows(results),
        eval_note=results.get("note", ""),
        command=record.get("command", ""),
        recipe_yaml=yaml.safe_dump(record, sort_keys=False, width=120).strip(),
        adapt=record.get("adapt"),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__.split("+")[0],
    )
    text = str(card)
    (folder / "README.md").write_text(text)
    return text


def _plain_family(folder: Path) -> str | None:
    """The family of a plain checkpoint (depth growth alone writes one), None for a surgery checkpoint."""
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return None if model_type in (None, "surgery") else model_type
