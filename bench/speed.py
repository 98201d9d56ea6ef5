"""Prefill and decode time of every recipe's checkpoint against stock transformers on the demo model.

    python bench/speed.py [--lengths 2048,8192] [--long 16384] [--rounds 5] [--decode 128] [--only NAME,...]

Protocol (issue 30): each measurement runs in its own process (`--child`), and each round runs stock transformers
and then every checkpoint, interleaved, so a machine's drift falls on all alike. Per checkpoint and length: the
median over rounds of prefill seconds and of decode milliseconds per token (the median of the greedy steps of a
round), each as a ratio to the same round's stock run, with the min–max of those ratios; and the K/V bytes the
cache holds after the prefill, from its tensors. `--long` runs only stock, identity, DynamicKV, StreamingLLM and PoD,
with the demo checkpoints' positions raised (config.json copies). Run it on a quiet machine with 2 threads:
oversubscribed OpenMP threads slow small decode steps several times over. Writes bench/results/speed.md after each
length. Unchanged on CUDA, where the checkpoints take the Triton kernels.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from surgery.evals.evaluate import timed_decode

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/surgery-speed")
KEEP = ["--keep", "0.2", "--keep-at-least", "0"]
RECIPES = {  # every recipe that rewrites attention, at its paper's operating point (or the untrained start)
    "identity": ["--recipe", "none"],
    "kvsharer (7 of 30 layers)": ["--recipe", "kvsharer", "--share-layers", "7", "--order", "similar"],
    "matryoshka (50% width)": ["--recipe", "matryoshka", "--kv-fraction", "0.5"],
    "pod (defaults)": ["--recipe", "pod"],
    "attention-gate (untrained: keeps all)": ["--recipe", "attention-gate"],
    "modification (untrained: routes all)": ["--recipe", "modification"],
    **{f"{policy} 20%": ["--recipe", policy, *KEEP]
       for policy in ("snapkv", "pyramid", "zigzag", "dynamickv", "streamingllm", "h2o")},
}
LONG = ("identity", "dynamickv 20%", "streamingllm 20%", "pod (defaults)")
NOT_TIMED = {"lesa, depth-up": "grow the model (more layers, more time by design)",
             "upcycle, adamoe": "need a mixture of experts; timed in bench/adamoe.py on the upcycled demo model"}



def checkpoint(name: str) -> Path:
    from click.testing import CliRunner

    from surgery.cli.main import main

    folder = WORK / name.split()[0]
    if not (folder / "config.json").is_file():
        result = CliRunner().invoke(main, ["-q", "convert", "demo", *RECIPES[name], "--out", str(folder),
                                           "--no-verify", "--overwrite"])
        assert result.exit_code == 0, result.stderr
    return folder


def run_once(model, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float, int]:
    """Prefill seconds, decode seconds for `decode_tokens` greedy steps, and the cache's K/V bytes after prefill."""
    return timed_decode(model, ids, decode_tokens, after_prefill=cache_bytes)


def cache_bytes(cache) -> int:
    """Bytes the cache holds for the tokens, from its tensors: a surgery cache counts every store's tensors (a
    gated layer's per-head slots, PoD's proximal keys), stock transformers' its layers' keys and values."""
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


def interleaved_timing(models: dict, ids: torch.Tensor, decode: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median prefill and decode seconds per model, the models interleaved in each repeat so that a machine's drift
    falls on all of them alike."""
    times = {name: {"prefill": [], "decode": []} for name in models}
    for model in models.values():
        run_once(model, ids[:, :32], 2)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            prefill, decoding, _ = run_once(model, ids, decode)
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decoding)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def child(folder: str, length: int, decode: int) -> None:
    """One measurement in this process: prefill `length` held-out tokens, then `decode` greedy steps, each timed."""
    import time

    from surgery.calibrate.text import heldout_text
    from surgery.checkpoint.loading import load_model

    torch.set_num_threads(int(os.environ.get("SPEED_THREADS", "2")))
    model, tokenizer = load_model(folder)
    if tokenizer is None:
        _, tokenizer = load_model("demo")
    text_ids = tokenizer(heldout_text() * 4, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([text_ids[:length]])
    if torch.cuda.is_available():  # on a GPU (where a surgery checkpoint's default attention is its Triton kernels)
        model, ids = model.cuda(), ids.cuda()

    def clock() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    with torch.no_grad():
        timed_decode(model, ids[:, :32], 2)  # warm-up
        begin = clock()
        out = model(ids, use_cache=True)
        prefill = clock() - begin
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        kv_bytes, steps = cache_bytes(cache), []
        for _ in range(decode):
            begin = clock()
            out = model(token, past_key_values=cache, use_cache=True)
            steps.append(clock() - begin)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    decode_ms = 1000 * statistics.median(steps) if steps else None
    print(json.dumps({"prefill_s": prefill, "decode_ms": decode_ms, "kv_bytes": kv_bytes}))


def wait_while_paused() -> None:
    """Between measurements, wait while the file named by SPEED_PAUSE exists: other work can then run on the
    machine without overlapping a measurement (the file is made, the "paused" line awaited, the work run, the file
    removed)."""
    import time

    pause = os.environ.get("SPEED_PAUSE")
    announced = False
    while pause and Path(pause).exists():
        if not announced:
            print("paused", flush=True)
            announced = True
        time.sleep(2)
    if announced:
        print("resumed", flush=True)


def measure(folder: Path, length: int, decode: int) -> dict:
    wait_while_paused()
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--length", str(length),
                          "--decode", str(decode)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def long_copy(folder: Path, positions: int) -> Path:
    """A copy of a checkpoint (weights linked, not copied) whose config allows `positions` tokens."""
    target = WORK / f"{folder.name}-{positions}"  # beside the benchmark's checkpoints, never in the source cache
    if not target.exists():
        target.mkdir()
        for path in folder.iterdir():
            if path.name != "config.json":
                (target / path.name).symlink_to(path.resolve())
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = max(config.get("max_position_embeddings", 0), positions)
        (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def ratio_cell(values: list[float], base: list[float]) -> str:
    ratios = [v / b for v, b in zip(values, base)]
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--long", default="16384")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--only", default=None, help="comma-separated checkpoint names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed.md")
    parser.add_argument("--child", default=None)
    parser.add_argument("--length", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.length, args.decode)
    from surgery.checkpoint.sources import resolve

    WORK.mkdir(exist_ok=True)
    stock = resolve("demo").folder  # the dequantized demo source: stock LlamaForCausalLM loads it
    names = [n for n in RECIPES if args.only is None or n.split()[0] in args.only.split(",")]
    folders = {name: checkpoint(name) for name in names}
    device = (f"{torch.cuda.get_device_name()} (surgery checkpoints on the Triton kernels)" if torch.cuda.is_available()
              else f"{platform.processor() or platform.machine()}, {os.environ.get('SPEED_THREADS', '2')} threads, "
                   "CPU only (no GPU was lent for this run)")
    lines = ["# Speed: every recipe's checkpoint against stock transformers (demo model, fp32)", "",
             f"`python bench/speed.py --lengths {args.lengths} --long {args.long} --rounds {args.rounds} --decode "
             f"{args.decode}`; {device}, torch {torch.__version__}; each measurement in its own process, stock and the checkpoints "
             "interleaved in each round. Cells: median ratio to the same round's stock run (min–max over rounds); "
             "decode is the median step of a round. Not timed: " +
             "; ".join(f"{k} ({v})" for k, v in NOT_TIMED.items()) + ".", ""]
    plan = [(int(n), names) for n in args.lengths.split(",") if n]
    plan += [(int(n), [name for name in names if name in LONG]) for n in args.long.split(",") if n]
    for length, run in plan:
        long = length > 8192
        source = long_copy(stock, length + args.decode) if long else stock
        targets = {name: long_copy(folders[name], length + args.decode) if long else folders[name] for name in run}
        results = {name: [] for name in ["stock transformers", *run]}
        for round_index in range(args.rounds):
            results["stock transformers"].append(measure(source, length, args.decode))
            for name in run:
                results[name].append(measure(targets[name], length, args.decode))
                print(f"{length} round {round_index} {name}: {results[name][-1]}", flush=True)
        base = results["stock transformers"]
        lines += [f"## {length} tokens", "", "| checkpoint | KV bytes after prefill | prefill s (median) | prefill × stock "
                  "| decode ms/token (median) | decode × stock |", "|---|---|---|---|---|---|"]
        for name, rows in results.items():
            lines.append(f"| {name} | {rows[0]['kv_bytes']:,} | {statistics.median(r['prefill_s'] for r in rows):.2f} | "
                         f"{ratio_cell([r['prefill_s'] for r in rows], [b['prefill_s'] for b in base])} | "
                         f"{statistics.median(r['decode_ms'] for r in rows):.1f} | "
                         f"{ratio_cell([r['decode_ms'] for r in rows], [b['decode_ms'] for b in base])} |")
        lines.append("")
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
