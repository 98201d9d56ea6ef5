"""`surgery compare CKPT... --baseline MODEL --out DIR`: several checkpoints measured on the same tokens, a table and
Pareto plots (KV bytes per token against held-out perplexity and against retrieval recall).

Every checkpoint reads the same held-out segments (perplexity through its compressed prompts, greedy agreement
with the baseline) and answers the same generated retrieval prompts; KV bytes are measured from each cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.base.intervals import share_with_interval
from surgery.calibrate.text import heldout_text, read_text
from surgery.calibrate.corpora import HAYSTACK, corpus_text
from surgery.base.errors import SurgeryError
from surgery.base.interrupts import raise_if_received
from surgery.evals.evaluate import (EvalSettings, baseline_continuations, compressed_agreement, compressed_quality, eval_segments,
                       resolve_inputs, setting_of)
from surgery.checkpoint.loading import load_source_model
from surgery.evals.passkey import default_keep
from surgery.evals.retrieval import DEFAULT_FORMAT, Haystack, generate
from surgery.evals.retrieval_eval import recall

DEFAULT_TASKS = ("niah_single_number", "niah_multikey")


@dataclass
class ComparePlan:
    """What `surgery compare` measures on: the quality settings, and the retrieval prompts."""

    quality: EvalSettings = field(default_factory=lambda: EvalSettings(segments=4, prompt_len=1024))
    tasks: tuple[str, ...] = DEFAULT_TASKS
    lengths: tuple[int, ...] = (1024, 2048)
    samples: int = 5
    seed: int = 0
    prompt_format: str = DEFAULT_FORMAT


@dataclass
class Point:
    """One model's measurements: a point on each plot."""

    name: str
    setting: str
    kv_bytes_per_token: float
    perplexity: float
    agreement: float
    retrieval: dict[str, float]  # "task@length" -> recall
    perplexity_interval: tuple[float, float] = (float("nan"), float("nan"))  # 95%, bootstrapped over segments
    agreement_interval: tuple[float, float] = (float("nan"), float("nan"))
    prompts: int = 0  # per retrieval cell: each recall's Wilson interval comes from it
    segment_nll: list[float] = field(default_factory=list)  # per eval segment: paired comparisons with another point
    segment_tokens: list[int] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return sum(self.retrieval.values()) / len(self.retrieval) if self.retrieval else float("nan")


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: less or equal x (KV bytes) and a better or equal y, with at
    least one strictly better. Sorted by x."""
    def beats(a, b):
        ya, yb = (a[1], b[1]) if higher_is_better else (-a[1], -b[1])
        return a[0] <= b[0] and ya >= yb and (a[0] < b[0] or ya > yb)
    front = [i for i, p in enumerate(points) if not any(beats(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: points[i][0])


def resolve_all(checkpoints: list[str], baseline: str, allow_pickle: bool):
    """Every model resolved, its config read and its vocabulary matched to the baseline's, before any loads."""
    resolved = [resolve_inputs(checkpoint, baseline, allow_pickle) for checkpoint in checkpoints]
    return resolved[0][1], [source for source, _, _ in resolved], resolved[0][2]


def setting_text(config, keep: float | None) -> str:
    setting = setting_of(config, keep)
    kept = f" keeps {setting['keep']}" if setting.get("keep") else ""
    return (", ".join(setting["recipes"]) or "source model") + kept


def measure_point(name: str, model, segments, continuations, prompts, tokenizer, plan: ComparePlan) -> Point:
    keep = default_keep(model, plan.quality.keep)
    quality = compressed_quality(model, segments, plan.quality)
    agreement, agreement_interval = compressed_agreement(model, segments, continuations, plan.quality)
    scores = {f"{task}@{length}": recall(model, tokenizer, batch, "query-aware", keep, plan.prompt_format)
              for (task, length), batch in prompts.items()}
    return Point(name, setting_text(model.config, keep), quality["kv_bytes_per_token"], quality["perplexity"],
                 agreement, scores, tuple(quality["perplexity_interval"]), agreement_interval, plan.samples,
                 quality["segment_nll"], quality["segment_tokens"])


def compare(checkpoints: list[str], baseline: str, plan: ComparePlan, data: str | None = None,
            allow_pickle: bool = False, progress: bool = True) -> list[Point]:
    """The baseline's point first, then each checkpoint's, all on the same tokens."""
    from tqdm.auto import tqdm

    base, sources, tokenizer = resolve_all(checkpoints, baseline, allow_pickle)
    text = heldout_text() if data is None else read_text(data, split="test")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]])
    segments = eval_segments(ids, plan.quality)
    haystack = Haystack(tokenizer, corpus_text(HAYSTACK))
    prompts = {(task, length): generate(task, tokenizer, haystack, length, plan.samples, plan.seed)
               for task in plan.tasks for length in plan.lengths}
    bar = tqdm(total=1 + len(sources), desc="compare", unit="model", disable=not progress)
    base_model = load_source_model(base)
    continuations = baseline_continuations(base_model, segments, plan.quality)
    points = [measure_point(f"baseline ({Path(base.name).name or base.name})", base_model, segments, continuations, prompts, tokenizer, plan)]
    del base_model
    bar.update()
    for checkpoint, source in zip(checkpoints, sources):
        model = load_source_model(source)
        points.append(measure_point(Path(checkpoint).name or checkpoint, model, segments, continuations, prompts,
                                    tokenizer, plan))
        del model
        bar.update()
    bar.close()
    return points


def table(points: list[Point], plan: ComparePlan) -> list[str]:
    """The Markdown table, with the Pareto fronts marked."""
    xy = [(p.kv_bytes_per_token, p.perplexity) for p in points]
    on_ppl = set(pareto_front(xy, higher_is_better=False))
    on_recall = set(pareto_front([(p.kv_bytes_per_token, p.recall) for p in points], higher_is_better=True))
    cells = list(points[0].retrieval)
    lines = ["| model | setting | KV bytes/token | perplexity | greedy agreement | retrieval (mean) | "
             + " | ".join(cells) + " | Pareto front |",
             "|---" * (7 + len(cells)) + "|"]
    for index, point in enumerate(points):
        fronts = [name for name, front in (("perplexity", on_ppl), ("retrieval", on_recall)) if index in front]
        low, high = point.perplexity_interval
        a_low, a_high = point.agreement_interval
        lines.append(f"| {point.name} | {point.setting} | {point.kv_bytes_per_token:,.0f} | {point.perplexity:.2f} "
                     f"({low:.2f}–{high:.2f}) | {point.agreement:.1%} ({a_low:.1%}–{a_high:.1%}) | {point.recall:.0%} | "
                     + " | ".join(share_with_interval(point.retrieval[cell], point.prompts) for cell in cells)
                     + f" | {', '.join(fronts) or '-'} |")
    return lines


def draw(axes, points: list[Point], metric: str) -> None:
    """KV bytes per token against `metric` ("perplexity" or "retrieval"), one point per model, front marked."""
    higher = metric == "retrieval"
    xy = [(p.kv_bytes_per_token, p.recall if higher else p.perplexity) for p in points]
    front = pareto_front(xy, higher_is_better=higher)
    axes.scatter([x for x, _ in xy], [y for _, y in xy], color="tab:blue", zorder=3)
    for point, (x, y) in zip(points, xy):
        axes.annotate(point.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="tab:red", linestyle="--", marker="o",
              label="Pareto front", zorder=2)
    axes.set_xlabel("KV-cache bytes per token (measured)")
    axes.set_ylabel("retrieval recall (mean)" if higher else "held-out perplexity (lower is better)")
    if not higher:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()


def plot(points: list[Point], path: Path, metrics: tuple[str, ...]) -> None:
    """One panel per metric, side by side, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.5), dpi=120, squeeze=False)
    for axes, metric in zip(panels[0], metrics):
        draw(axes, points, metric)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(points: list[Point], plan: ComparePlan, out: Path, overwrite: bool, title: str = "") -> None:
    """compare.md, compare.json and the two PNGs, written to a temporary folder then moved into place, so a failed
    run leaves no half-written report."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SurgeryError(f"{out} exists and is not empty", hint="pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plot(points, staging / "kv_vs_perplexity.png", ("perplexity",))
        plot(points, staging / "kv_vs_retrieval.png", ("retrieval",))
        quality = plan.quality
        lines = [f"# {title or 'KV-cache compression compared'}", "",
                 f"Perplexity: {quality.segments} prompts of {quality.prompt_len} tokens of held-out prose, each "
                 f"compressed as generate() does, then {quality.score_tokens} tokens scored; greedy agreement with "
                 f"the baseline over {quality.agreement_new_tokens} tokens. Retrieval: {plan.samples} prompts per "
                 f"task and length (seed {plan.seed}, `{plan.prompt_format}` format, query-aware), string-match "
                 "recall. KV bytes per token are measured from each cache after the scored tokens. In brackets: 95% "
                 "intervals (perplexity and agreement bootstrapped over the prompts, recall by Wilson over a cell's "
                 "prompts); two models differ only where the evidence rule's paired interval says so.", "",
                 *table(points, plan), "",
                 "![KV bytes against perplexity](kv_vs_perplexity.png)", "",
                 "![KV bytes against retrieval](kv_vs_retrieval.png)", ""]
        (staging / "compare.md").write_text("\n".join(lines))
        (staging / "compare.json").write_text(json.dumps([vars(p) for p in points], indent=2) + "\n")
        raise_if_received()
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
