"""MatryoshkaKV's rank search on the demo model: the fast (coarse-then-fine) search against the exhaustive one,
layer by layer against the whole-model path, and the time of the README's convert command.

Writes bench/results/matryoshka_search.md. Offline, CPU; about 40 minutes on 2 cores:

    python bench/matryoshka_search.py [--budgets 0.75,0.5,0.375,0.25] [--skip-whole-model]

Calibration is the one `bench/matryoshka.py` used (32 × 128 self-generated tokens, seed 0; the search scores
4 × 32 of them), so the held-out perplexities compare with that table's "PCA only, searched" rows, which the
whole-model exhaustive search produced before the search moved onto the layer runner.
"""

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from surgery.arch.matryoshka_surgery import set_kv_ranks
from surgery.calibrate.text import CalibrationSettings, calibration_ids, heldout_text
from surgery.calibrate.corpora import SELF_GENERATED
from surgery.calibrate.source_model import load_calibration_model
from surgery.evals.evaluate import perplexity
from surgery.checkpoint.families import surgery_config_from_source
from surgery.calibrate.layer_runner import LayerRunner
from matryoshka import install
from surgery.recipes.matryoshka import KLCurves, MatryoshkaKV, kl_from, rank_lists, search_ranks
from surgery.checkpoint.sources import resolve

RESULTS = Path(__file__).parent / "results" / "matryoshka_search.md"
# "PCA only, searched" perplexities of bench/results/matryoshka.md (whole-model exhaustive search, same calibration)
BEFORE = {0.75: 70.84, 0.5: 163.81, 0.375: 279.33, 0.25: 602.45}


def whole_model_scorer(model, projections: dict, ids: torch.Tensor, reference: list[torch.Tensor]):
    """The search trial as the whole-model path ran it: every layer, the full forward pass."""
    config = model.config
    full_ranks = {(l, h, k): config.head_dim for l in projections for h in range(config.num_key_value_heads)
                  for k in ("key", "value")}
    install(model, projections, full_ranks)

    def score(candidate, rank) -> float:
        set_kv_ranks(model, *rank_lists(config, list(projections), {**full_ranks, candidate: rank}))
        with torch.no_grad():
            return kl_from(reference, [model(ids, use_cache=False).logits.float().log_softmax(-1)])

    return score


def steps_apart(a: dict, b: dict, step: int) -> int:
    return max(abs(a[key] - b[key]) // step for key in a)


def timed_convert(budget: float) -> float:
    """Wall time of `surgery convert demo --recipe matryoshka --kv-fraction B` as a user runs it, default settings."""
    work = Path(tempfile.mkdtemp(prefix="mkv-time-"))
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "surgery", "convert", "demo", "--recipe", "matryoshka", "--kv-fraction",
                        str(budget), "--out", str(work / "out")], check=True)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.75,0.5,0.375,0.25")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--skip-whole-model", action="store_true", help="skip the whole-model exhaustive search")
    parser.add_argument("--fast-only", action="store_true",
                        help="only the fast search (the exhaustive ones take about 45 minutes more on 2 cores)")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]

    convert_s = timed_convert(0.5)
    print(f"convert --kv-fraction 0.5: {convert_s:.0f} s", flush=True)

    source = resolve("demo")
    config = surgery_config_from_source(source.config)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    model = load_calibration_model(source, config)
    recipe = MatryoshkaKV()
    settings = CalibrationSettings(source=SELF_GENERATED, num_samples=32, seq_len=128, seed=0)
    calib = calibration_ids(settings, tokenizer, model)
    eval_ids = torch.tensor([tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][: args.eval_tokens]])

    runner = LayerRunner(source.folder, config, calib, 8)
    start = time.perf_counter()
    projections, spectra = recipe.install_pca(runner, config.owner_layers, progress=True)
    pca_s = time.perf_counter() - start
    searcher = runner.on(calib[: recipe.search_samples, : recipe.search_len])
    reference = searcher.log_probs(searcher.run(runner.kv_source).final)
    score = recipe.trial_scorer(searcher, projections, reference)

    results, timings, trials = {}, {}, {}
    methods = [("fast", "layer by layer")] + ([] if args.fast_only else [("exhaustive", "layer by layer")])
    if not args.skip_whole_model and not args.fast_only:
        methods.append(("exhaustive", "whole model"))
    for method, path in methods:
        scorer = score if path == "layer by layer" else whole_model_scorer(model, projections, searcher.ids, reference)
        curves = KLCurves(config.head_dim, spectra)
        start = time.perf_counter()
        results[method, path] = search_ranks(scorer, curves, budgets, method, progress=True)
        timings[method, path] = time.perf_counter() - start
        trials[method, path] = sum(map(len, curves.measured.values()))
        print(method, path, f"{timings[method, path]:.0f} s, {trials[method, path]} trials", flush=True)

    step = config.head_dim // 8
    rows = []
    for budget in budgets:
        row = {"budget": budget}
        for key, snapshots in results.items():
            install(model, projections, snapshots[budget])
            row[key] = perplexity(model, eval_ids, 512, 256)
        rows.append(row)
        print(row, flush=True)

    fast, exhaustive = results["fast", "layer by layer"], results.get(("exhaustive", "layer by layer"))
    lines = [
        "# MatryoshkaKV rank search on SmolLM2-135M-Instruct",
        "",
        f"Generated by `python bench/matryoshka_search.py` on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, float32, CPU.",
        "",
        f"`surgery convert demo --recipe matryoshka --kv-fraction 0.5` with default settings (calibration, PCA, fast "
        f"search, export, verify): **{convert_s / 60:.1f} min** wall.",
        "",
        f"Calibration: 32 × 128 self-generated tokens (seed 0), as in `bench/matryoshka.py`; PCA {pca_s:.0f} s; the "
        f"search scores KL on {searcher.ids.shape[0]} × {searcher.ids.shape[1]} tokens. One search pass walks down to "
        f"the smallest budget and is snapshotted at each (the fast search's fine stage measures around every budget's "
        "boundary). Perplexity: held-out text (`pydoc_data.topics`), windows of 512, stride 256, PCA only (no "
        "training).",
        "",
        "| search | path | trials | time (s) |",
        "|---|---|---|---|",
    ]
    for key in results:
        lines.append(f"| {key[0]} | {key[1]} | {trials[key]} | {timings[key]:.0f} |")
    lines += ["", "| KV budget | before (whole model, exhaustive) | " + " | ".join(f"{m}, {p}" for m, p in results)
              + " | fast vs before | fast vs exhaustive: max steps apart per head |",
              "|---|---|" + "---|" * len(results) + "---|---|"]
    for row in rows:
        budget = row["budget"]
        before = BEFORE.get(budget)
        change = f"{row['fast', 'layer by layer'] / before - 1:+.1%}" if before else "-"
        cells = " | ".join(f"{row[key]:.2f}" for key in results)
        apart = "not run (--fast-only)" if exhaustive is None else steps_apart(fast[budget], exhaustive[budget], step)
        lines.append(f"| {budget:.1%} | {before if before else '-'} | {cells} | {change} | {apart} |")
    if ("exhaustive", "whole model") in results:
        whole = results["exhaustive", "whole model"]
        lines += ["", "Layer by layer against the whole-model path (exhaustive search, same trials): max steps apart "
                  "per head at each budget: " + ", ".join(
                      f"{b:.1%}: {steps_apart(exhaustive[b], whole[b], step)}" for b in budgets) + "."]
    lines.append("")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
