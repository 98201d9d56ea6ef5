"""The scoreboard: every recipe and policy at its paper's headline operating point (and a budget sweep for the KV
methods) on the demo model, with 95% intervals, speed from bench/results/speed.md, the paper's claim and a verdict.

    python bench/scoreboard.py [--only NAME,...] [--trained NAME=PATH ...] [--work DIR] [--quick]

Built on `surgery compare`'s measurements (`surgery.evals.compare.measure_point`): every checkpoint reads the same
held-out segments and answers the same generated retrieval prompts as the source model.
- Perplexity: held-out prose (`python-reference`, never calibrated or trained on), each segment's prompt
  compressed as generate() does, then 128 tokens scored: 800 segments (102,400 scored tokens) for the recipes
  that change weights, 200 for the eviction policies (the issue's ≥ 100k tokens and ≥ 200 windows). 95% interval:
  bootstrap over segments; against the source, the paired ratio of perplexities (the evidence rule).
- Retrieval: RULER-style single-needle and multi-key prompts at 2k and 4k, 50 per cell, Wilson intervals.
- Speed: the decode and prefill ratios to stock at 8k from `bench/results/speed.md` (its own protocol).
- Verdict: "reproduced" where the saving measured in the cache (or in FLOPs) reaches the paper's and the paired
  perplexity ratio's interval stays under the quality bound the claim implies (`Entry.ratio_bound`: this bench's
  reading of each paper's quality claim as a held-out perplexity ratio, a translation the table states per row); "refuted" where the interval lies
  above that bound at the paper's saving; otherwise "not testable at this scale", with the reason (untrained,
  or the interval too wide).

Resumable per cell: each point is written to bench/results/scoreboard.json as soon as it is measured; a rerun
measures only what is missing (`--redo NAME` to measure one again). Converted checkpoints stay in --work.
Full sizes take CPU-hours on 2 cores (about 25 min per point); `--quick` runs a smoke-sized plan into
/tmp/scoreboard-quick (never into bench/results).
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from surgery.base.intervals import perplexity_ratio_interval, verdict
from surgery.base.intervals import share_with_interval
from surgery.evals.compare import ComparePlan, Point, measure_point, plot
from surgery.evals.evaluate import EvalSettings

RESULTS = Path(__file__).parent / "results"
SOURCE_EVICTION = "source (eviction plan)"  # the source on the eviction policies' segments, to pair them with


@dataclass
class Entry:
    """One row: how to convert it, what its paper claims, and the claim in numbers (a saving and the perplexity
    ratio to the source that the claimed quality loss allows; None where the paper gives no such number)."""

    name: str
    convert: list[str]
    claim: str
    saving: float | None = None  # fraction of KV bytes (or FLOPs, for `flops`) the paper saves
    ratio_bound: float | None = None  # perplexity / source's that the claimed quality allows
    flops: bool = False
    trains: str | None = None  # what the paper trains; untrained here → not testable
    weights: bool = False  # changes weights: the 100k-token perplexity plan


KEEP = ["--keep-at-least", "0"]
ENTRIES = [
    Entry("kvsharer", ["--recipe", "kvsharer", "--share-layers", "7"],
          "KVSharer: 25% of layers share, 30% KV saved, >95% of the model's performance (Llama-2-7B)",
          saving=0.23, ratio_bound=1.05, weights=True),
    Entry("matryoshka", ["--recipe", "matryoshka", "--kv-fraction", "0.6"],
          "MatryoshkaKV: 60% of the KV kept, >90% of full performance after training (LLaMA2-7B)",
          saving=0.40, ratio_bound=1.10, trains="continual pre-training of the bases", weights=True),
    Entry("pod", ["--recipe", "pod"], "PoD: 35% of the KV saved for a 2.8% score drop after 5B tokens",
          saving=0.35, ratio_bound=1.03, trains="5B tokens of post-training", weights=True),
    Entry("pod-whole", ["--recipe", "pod", "--similarity", "whole"], "PoD, grouping on whole attention rows",
          saving=0.35, ratio_bound=1.03, trains="5B tokens of post-training", weights=True),
    Entry("attention-gate", ["--recipe", "attention-gate"],
          "Attention-Gate: about 30% of tokens kept with no loss after continued pre-training",
          saving=0.70, ratio_bound=1.02, trains="continued pre-training of the gates", weights=True),
    Entry("modification", ["--recipe", "modification"],
          "MoDification: about 1.2× lower latency and 1.8× less memory at 3B-70B, small loss", saving=0.25,
          flops=True, trains="the routers (and layers)", weights=True),
    Entry("lesa", ["--recipe", "lesa"], "LESA: grown layers reach lower perplexity than LLaMA-Pro and SOLAR",
          trains="continual pre-training", weights=True),
    Entry("depth-up", ["--recipe", "depth-up"], "LLaMA-Pro: identity blocks, trained alone", trains="the new blocks",
          weights=True),
    Entry("adamoe", ["--recipe", "upcycle,adamoe"], "AdaMoE: 14.5% fewer FLOPs with +1.69% ARC-C (Mixtral)",
          saving=0.145, flops=True, trains="fine-tuning with null experts", weights=True),
    *[Entry(f"{policy} {keep:.0%}", ["--recipe", policy, "--keep", str(keep), *KEEP], claim,
            saving=1 - keep, ratio_bound=1.05)
      for policy, claim in (
          ("snapkv", "SnapKV: LongBench within 1 point of the full cache at a 1,024-token budget"),
          ("pyramid", "PyramidKV: at 12% of the KV, LongBench close to the full cache"),
          ("zigzag", "ZigZagKV: at or above SnapKV at the same budget"),
          ("dynamickv", "DynamicKV: 85% of full performance at 1.7% of the KV"),
          ("streamingllm", "StreamingLLM: stable perplexity with 4 sinks and a recent window"),
          ("h2o", "H2O: 20% heavy hitters, comparable accuracy"))
      for keep in (0.1, 0.2, 0.4)],
]


def plans(quick: bool) -> dict[bool, ComparePlan]:
    """The plan per kind (True: weights change), the issue's sizes, or a smoke-sized one."""
    if quick:
        quality = EvalSettings(segments=3, prompt_len=256, score_tokens=32, agreement_new_tokens=8)
        return {kind: ComparePlan(quality=quality, lengths=(512,), samples=2) for kind in (True, False)}
    lengths, samples = (2048, 4096), 50
    return {True: ComparePlan(quality=EvalSettings(segments=800, prompt_len=1024, score_tokens=128),
                              lengths=lengths, samples=samples),
            False: ComparePlan(quality=EvalSettings(segments=200, prompt_len=1024, score_tokens=128),
                               lengths=lengths, samples=samples)}


def speed_key(name: str) -> str:
    """How a row of speed.md and a scoreboard row meet: the recipe's name, and a policy's budget ("snapkv 20%")."""
    words = name.split()
    return words[0] + (" " + words[-1] if "%" in name else "")


def speed_ratios(path: Path) -> dict[str, dict[str, str]]:
    """From speed.md, per `speed_key`: the prefill and decode cells of the longest length."""
    ratios: dict[str, dict[str, str]] = {}
    if not path.is_file():
        return ratios
    for line in path.read_text().splitlines():  # later sections (longer prompts) overwrite earlier ones
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 6 and "×" in cells[3]:
            ratios[speed_key(cells[0])] = {"prefill": cells[3], "decode": cells[5]}
    return ratios


def cache_saving(entry: Entry, point: Point, base: Point, plan: ComparePlan) -> float:
    """The KV saved, measured from the caches. An eviction policy compresses the prompt only (the scored tokens
    after it are held whole), and its paper's saving is of the prompt: the scored tokens' bytes are taken out."""
    saved = 1 - point.kv_bytes_per_token / base.kv_bytes_per_token
    if entry.weights:
        return saved
    prompt, scored = plan.quality.prompt_len, plan.quality.score_tokens
    return saved * (prompt + scored) / prompt


def judge(entry: Entry, point: Point, base: Point, trained: bool, plan: ComparePlan) -> tuple[str, str]:
    """(saving text, verdict) for one row."""
    saved = cache_saving(entry, point, base, plan)
    ratio = perplexity_ratio_interval(point.segment_nll, base.segment_nll, point.segment_tokens)
    saving_text = f"{saved:.1%} of the {'KV' if entry.weights else 'prompt KV'}" + (
        "" if not entry.flops else " (the saving is in FLOPs: see the recipe's bench)")
    if entry.trains and not trained:
        return saving_text, f"not testable at this scale: untrained (the paper: {entry.trains})"
    if entry.saving is None or entry.ratio_bound is None:
        return saving_text, "not testable at this scale: the claim has no number this bench measures"
    if entry.flops:
        return saving_text, "not testable here: FLOPs are measured by the recipe's own bench"
    reaches = saved >= entry.saving - 0.02
    if reaches and ratio[1] <= entry.ratio_bound:
        return saving_text, "reproduced"
    if reaches and ratio[0] > entry.ratio_bound:
        return saving_text, f"refuted: perplexity ratio {ratio[0]:.3f}–{ratio[1]:.3f} above {entry.ratio_bound}"
    if not reaches:
        return saving_text, f"not testable at this scale: saves {saved:.0%} where the paper saves {entry.saving:.0%}"
    return saving_text, f"not testable at this sample size: ratio interval {ratio[0]:.3f}–{ratio[1]:.3f} spans {entry.ratio_bound}"


def render(state: dict, out: Path, command: str, kinds: dict[bool, ComparePlan]) -> None:
    points = {name: Point(**{**p, "perplexity_interval": tuple(p["perplexity_interval"]),
                             "agreement_interval": tuple(p["agreement_interval"])})
              for name, p in state["points"].items()}
    if "source" not in points or SOURCE_EVICTION not in points:
        return
    speeds = speed_ratios(RESULTS / "speed.md")
    lines = ["# Scoreboard: every recipe and policy on SmolLM2-135M-Instruct", "",
             f"`{command}` on {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"float32, CPU; {state.get('cpu_minutes', 0):.0f} CPU-minutes of measuring so far. "
             "Protocol: bench/scoreboard.py's docstring. In brackets: 95% intervals. Speed: 8k ratios to stock "
             "transformers from bench/results/speed.md (its own protocol). Trained rows name their seeds; "
             "untrained rows of recipes their papers train are \"not testable at this scale\".", "",
             "| row | saving (cache) | perplexity | / source, paired | greedy agreement | retrieval ("
             + ", ".join(next(iter(points.values())).retrieval) + ") | prefill × stock | decode × stock | "
             "paper's claim | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    missing = []
    for entry in [*ENTRIES, *state.get("trained_entries", [])]:
        entry = entry if isinstance(entry, Entry) else Entry(**entry)
        point = points.get(entry.name)
        if point is None:
            missing.append(entry.name)
            continue
        base = points["source" if entry.weights else SOURCE_EVICTION]
        ratio = perplexity_ratio_interval(point.segment_nll, base.segment_nll, point.segment_tokens)
        saving_text, outcome = judge(entry, point, base, entry.name in state.get("trained", {}), kinds[entry.weights])
        speed = speeds.get(speed_key(entry.name), {})
        low, high = point.perplexity_interval
        cells = " / ".join(share_with_interval(point.retrieval[cell], point.prompts) for cell in point.retrieval)
        lines.append(f"| {entry.name} | {saving_text} | {point.perplexity:.2f} ({low:.2f}–{high:.2f}) | "
                     f"{point.perplexity / base.perplexity:.3f} ({ratio[0]:.3f}–{ratio[1]:.3f}, {verdict(ratio)}) | "
                     f"{point.agreement:.1%} | {cells} | {speed.get('prefill', '-')} | {speed.get('decode', '-')} | "
                     f"{entry.claim} | {outcome} |")
    base = points["source"]
    lines += ["", f"Source: perplexity {base.perplexity:.2f} ({base.perplexity_interval[0]:.2f}–"
              f"{base.perplexity_interval[1]:.2f}); retrieval " + " / ".join(
                  share_with_interval(base.retrieval[c], base.prompts) for c in base.retrieval) + ".", ""]
    if missing:
        lines += [f"Rows not measured yet (run the command again to continue): {', '.join(missing)}.", ""]
    lines += ["![Pareto plots](scoreboard.png)", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "scoreboard.md").write_text("\n".join(lines))
    plot(list(points.values()), out / "scoreboard.png", ("perplexity", "retrieval"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated row names (default: every row)")
    parser.add_argument("--trained", action="append", default=[], metavar="NAME=PATH",
                        help="a checkpoint trained with `surgery adapt`, measured as row NAME (repeatable)")
    parser.add_argument("--redo", action="append", default=[], help="measure this row again")
    parser.add_argument("--work", type=Path, default=Path("/tmp/surgery-scoreboard"))
    parser.add_argument("--quick", action="store_true", help="smoke-sized plan, into /tmp/scoreboard-quick")
    args = parser.parse_args()
    out = Path("/tmp/scoreboard-quick") if args.quick else RESULTS
    state_path = out / "scoreboard.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"points": {}, "trained": {}}
    state["trained"].update(dict(item.split("=", 1) for item in args.trained))
    command = "python bench/scoreboard.py" + (" --quick" if args.quick else "")
    kinds = plans(args.quick)

    from transformers import AutoTokenizer

    from surgery.calibrate.corpora import HAYSTACK, corpus_text
    from surgery.calibrate.text import heldout_text
    from surgery.checkpoint.loading import load_source_model
    from surgery.checkpoint.sources import resolve
    from surgery.evals.evaluate import baseline_continuations, eval_segments
    from surgery.evals.retrieval import Haystack, generate

    source = resolve("demo")
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    ids = torch.tensor([tokenizer(heldout_text(), add_special_tokens=False, verbose=False)["input_ids"]])
    haystack = Haystack(tokenizer, corpus_text(HAYSTACK))
    base_model = load_source_model(source)
    cache: dict[bool, tuple] = {}

    def inputs(weights: bool):
        """Segments, the source's continuations and the retrieval prompts of a plan, made once."""
        if weights not in cache:
            plan = kinds[weights]
            segments = eval_segments(ids, plan.quality)
            prompts = {(task, length): generate(task, tokenizer, haystack, length, plan.samples, plan.seed)
                       for task in plan.tasks for length in plan.lengths}
            cache[weights] = (plan, segments, baseline_continuations(base_model, segments, plan.quality), prompts)
        return cache[weights]

    def save(name: str, point: Point, seconds: float) -> None:
        state["points"][name] = vars(point)
        state["cpu_minutes"] = state.get("cpu_minutes", 0) + seconds / 60
        out.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1) + "\n")
        render(state, out, command, kinds)
        print(f"measured {name} ({seconds / 60:.1f} min)", flush=True)

    rows = [entry for entry in ENTRIES if args.only is None or entry.name in args.only.split(",")]
    rows += [Entry(name, [], "trained with `surgery adapt` (see its recipe.yaml)", weights=True)
             for name in state["trained"]]
    for weights, name in ((True, "source"), (False, SOURCE_EVICTION)):  # each plan's rows pair with its own
        if name not in state["points"] or name in args.redo:
            began = time.perf_counter()
            plan, segments, continuations, prompts = inputs(weights)
            save(name, measure_point(name, base_model, segments, continuations, prompts, tokenizer, plan),
                 time.perf_counter() - began)
    for entry in rows:
        if entry.name in state["points"] and entry.name not in args.redo:
            continue
        began = time.perf_counter()
        folder = Path(state["trained"].get(entry.name) or args.work / entry.name.replace(" ", "-"))
        if not (folder / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "surgery", "-q", "convert", "demo", *entry.convert, "--no-verify",
                            "--overwrite", "--out", str(folder)], check=True)
        plan, segments, continuations, prompts = inputs(entry.weights)
        model = load_source_model(resolve(str(folder)))
        point = measure_point(entry.name, model, segments, continuations, prompts, tokenizer, plan)
        del model
        save(entry.name, point, time.perf_counter() - began)
    render(state, out, command, kinds)
    print(f"wrote {out / 'scoreboard.md'}")


if __name__ == "__main__":
    main()
