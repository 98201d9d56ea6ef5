"""KVSharer on the demo model (SmolLM2-135M-Instruct): shared layers × pair order.

Writes bench/results/kvsharer.md. Runs offline on CPU (about 20 minutes on 2 cores):

    python bench/kvsharer.py [--layers 0,4,7,10] [--orders dissimilar,similar,random] [--calib self-generated]

Each plan is evaluated on one float32 model whose layers are re-pointed in place; a sharing layer's unused
k_proj/v_proj sit idle, so logits equal those of the exported checkpoint, and the cache holds only the owners' K/V.
"""

import argparse
import platform
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from surgery.arch.kvsharer_surgery import set_kv_sources
from surgery.calibrate.text import CalibrationSettings, calibration_ids, heldout_text
from surgery.calibrate.source_model import load_calibration_model
from surgery.calibrate.corpora import DEFAULT_CALIBRATION, SELF_GENERATED
from surgery.evals.evaluate import greedy_agreement, greedy_continuations, kv_bytes_per_token, perplexity, speed
from surgery.checkpoint.families import surgery_config_from_source
from surgery.calibrate.layer_runner import LayerRunner
from surgery.recipes.kvsharer import KVSharer
from surgery.checkpoint.sources import resolve

RESULTS = Path(__file__).parent / "results" / "kvsharer.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0,4,7,10")
    parser.add_argument("--orders", default="dissimilar,similar,random")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--decode-context", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", default=DEFAULT_CALIBRATION, help="calibration text, as convert's --calib")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--adapt-layers", default="4,7", help="shared-layer counts to adapt (dissimilar order)")
    parser.add_argument("--adapt-steps", type=int, default=100)
    parser.add_argument("--adapt-samples", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    source = resolve("demo")
    config = surgery_config_from_source(source.config)
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    model = load_calibration_model(source, config)
    settings = CalibrationSettings(source=args.calib, num_samples=30, seq_len=64, seed=args.seed)
    args.calibration = settings.description
    calib = calibration_ids(settings, tokenizer, model)

    text_ids = torch.tensor([tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]])
    eval_ids = text_ids[:, : args.eval_tokens]
    decode_ids = text_ids[:, -args.decode_context:]  # a different stretch of the held-out text
    prompts = torch.cat([eval_ids[:, i * 1024 : i * 1024 + 64] for i in range(4)])
    identity = list(range(config.num_hidden_layers))
    set_kv_sources(model, identity)
    reference = greedy_continuations(model, prompts, 32)

    rows, maps = [], []
    for order in args.orders.split(","):
        for layers in [int(n) for n in args.layers.split(",")]:
            if layers == 0 and order != args.orders.split(",")[0]:
                continue
            start = time.perf_counter()
            if layers:
                runner = LayerRunner(source.folder, config, calib, 8)
                plan = KVSharer(share_layers=layers, order=order).plan(runner, calib, args.seed, progress=False)
            else:  # the base model
                plan = {"kv_source": identity, "candidates_tried": 0}
            search_s = time.perf_counter() - start
            set_kv_sources(model, plan["kv_source"])
            row = {
                "order": order if layers else "-",
                "shared": layers,
                "perplexity": perplexity(model, eval_ids, 512, 256),
                "kv_bytes_per_token": kv_bytes_per_token(model, eval_ids[:, :512]),
                "greedy_agreement": greedy_agreement(model, reference, 64),
                "decode_tokens_per_s": speed(model, decode_ids, 32)["decode_tokens_per_s"],
                "search_s": search_s,
                "tried": plan["candidates_tried"],
            }
            set_kv_sources(model, identity)
            rows.append(row)
            sharing = [f"{i}→{s}" for i, s in enumerate(plan["kv_source"]) if s != i]
            maps.append(f"- {order}, {layers}: {', '.join(sharing) or 'none'}")
            print(row, flush=True)

    del model
    write_results(args, rows, maps, [], eval_ids, decode_ids)  # the sweep is on disk before the long training runs
    adapted = adapt_rows(args, tokenizer, eval_ids, {row["shared"]: row for row in rows if row["order"] == "dissimilar"})
    write_results(args, rows, maps, adapted, eval_ids, decode_ids)


def write_results(args, rows, maps, adapted, eval_ids, decode_ids) -> None:
    base = rows[0]
    lines = [
        "# KVSharer on SmolLM2-135M-Instruct",
        "",
        f"Generated by `python bench/kvsharer.py --calib {args.calib}` on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32, CPU.",
        "",
        f"- Calibration: 30 samples × 64 tokens of {args.calibration} (seed {args.seed}), threshold 0.5, as in the paper.",
        f"- Perplexity: {eval_ids.shape[1]} tokens of Python's reference manual prose (`pydoc_data.topics`), "
        "never seen by calibration; windows of 512, stride 256.",
        "- KV bytes per token: measured from the cache's tensors after a 512-token prefill.",
        "- Greedy agreement: share of the base model's 4 × 32 greedy tokens that the shared model also picks.",
        f"- Decode tokens/s: greedy decode of 32 tokens after a {decode_ids.shape[1]}-token prompt, batch 1.",
        "",
        "| order | shared layers | perplexity | Δ ppl | KV bytes/token | KV saved | greedy agreement | decode tok/s | search s | pairs tried |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['order']} | {row['shared']} | {row['perplexity']:.2f} | "
            f"{row['perplexity'] / base['perplexity'] - 1:+.0%} | {row['kv_bytes_per_token']:,.0f} | "
            f"{1 - row['kv_bytes_per_token'] / base['kv_bytes_per_token']:.1%} | {row['greedy_agreement']:.1%} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['search_s']:.0f} | {row['tried']} |"
        )
    lines += ["", "Sharing maps (layer → layer whose cache it reads):", "", *maps, ""]
    if adapted:
        lines += [
            "## After `surgery adapt` (beyond the paper, which does not train)",
            "",
            f"The sharing layers' q_proj and o_proj are trained by distillation from the base model (α = 1: pure KL), "
            f"{args.adapt_steps} steps of 8 × 128 tokens on {args.adapt_samples} self-generated sequences, lr 1e-3. "
            "Gap closed = (ppl before − ppl after) / (ppl before − base ppl).",
            "",
            "| shared layers | ppl before | ppl after | base ppl | gap closed | greedy agreement after | training |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in adapted:
            closed = (row["before"] - row["after"]) / (row["before"] - base["perplexity"])
            lines.append(f"| {row['shared']} | {row['before']:.2f} | {row['after']:.2f} | {base['perplexity']:.2f} | "
                         f"{closed:.0%} | {row['agreement']:.1%} | {row['note']} |")
        lines.append("")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print(f"wrote {args.results}")


def adapt_rows(args, tokenizer, eval_ids, before: dict) -> list[dict]:
    """Convert (dissimilar order) through the real path, adapt, and measure the trained checkpoint."""
    import shutil
    import tempfile

    from surgery.adapt.engine import AdaptSettings, adapt
    from surgery.pipelines.convert import ConvertRequest, convert
    from surgery.checkpoint.loading import load_model

    layers = [int(n) for n in args.adapt_layers.split(",") if n]
    if not layers or not args.adapt_steps:
        return []
    work = Path(tempfile.mkdtemp(prefix="kvsharer-bench-"))
    teacher, _ = load_model("demo")
    generated = calibration_ids(CalibrationSettings(SELF_GENERATED, args.adapt_samples, 128, args.seed + 1), tokenizer, teacher)
    (work / "train.txt").write_text("\n\n".join(tokenizer.batch_decode(generated, skip_special_tokens=True)))
    prompts = torch.cat([eval_ids[:, i * 1024 : i * 1024 + 64] for i in range(4)])
    reference = greedy_continuations(teacher, prompts, 32)
    del teacher
    rows = []
    try:
        for count in layers:
            ckpt = convert(ConvertRequest(model="demo", recipes=[KVSharer(share_layers=count)], out=work / f"c{count}",
                                          verify=False, progress=False, seed=args.seed))
            settings = AdaptSettings(teacher="demo", data=str(work / "train.txt"), steps=args.adapt_steps,
                                     num_samples=args.adapt_samples, seed=args.seed, save_every=0)
            start = time.perf_counter()
            trained = adapt(ckpt, work / f"t{count}", settings, verify=False, progress=True)
            wall = time.perf_counter() - start
            student, _ = load_model(str(trained))
            tokens = args.adapt_steps * settings.batch_size * settings.seq_len
            rows.append({"shared": count, "before": before[count]["perplexity"],
                         "after": perplexity(student, eval_ids, 512, 256),
                         "agreement": greedy_agreement(student, reference, 64),
                         "note": f"{args.adapt_steps} steps, {tokens:,} tokens, {wall:.0f} s"})
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
