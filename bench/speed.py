"""Prefill and decode time of surgery checkpoints against stock transformers on the demo model.

    python bench/speed.py [--lengths 2048,8192] [--repeats 5] [--decode 32]

Models: stock `LlamaForCausalLM`, the identity conversion (`--recipe none`), KVSharer (7 of 30 layers share) and
DynamicKV at a 20% budget. Timings on a shared 2-core machine swing widely, so every repetition runs every model
once, interleaved, and the table gives the median with the min-max spread, and each model's median relative to
stock's. The kept KV fraction is measured from the cache's tensors after the prefill. Writes
bench/results/speed.md.
"""

import argparse
import platform
import statistics
from pathlib import Path

import torch

from surgery.evals.evaluate import timed_decode

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/surgery-speed")
CHECKPOINTS = {
    "identity": ["--recipe", "none"],
    "kvsharer (7 layers)": ["--recipe", "kvsharer", "--share-layers", "7", "--order", "similar",
                            "--num-samples", "8", "--seq-len", "64"],
    "dynamickv 20%": ["--recipe", "dynamickv", "--keep", "0.2"],
}


def checkpoint(name: str) -> Path:
    from click.testing import CliRunner

    from surgery.cli.main import main

    folder = WORK / name.split()[0]
    if not (folder / "config.json").is_file():
        result = CliRunner().invoke(main, ["-q", "convert", "demo", *CHECKPOINTS[name], "--out", str(folder),
                                           "--no-verify", "--overwrite"])
        assert result.exit_code == 0, result.stderr
    return folder


def run_once(model, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float, int]:
    """Prefill seconds, decode seconds for `decode_tokens` greedy steps, and the cache's K/V bytes after prefill."""
    return timed_decode(model, ids, decode_tokens, after_prefill=cache_bytes)


def cache_bytes(cache) -> int:
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", type=int, default=32)
    args = parser.parse_args()
    from surgery.calibrate.text import heldout_text
    from surgery.checkpoint.loading import load_model

    WORK.mkdir(exist_ok=True)
    stock, tokenizer = load_model("demo")
    models = {"stock transformers": stock}
    models.update({name: load_model(str(checkpoint(name)))[0] for name in CHECKPOINTS})
    text_ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    lines = ["# Speed: surgery checkpoints against stock transformers (demo model, fp32)", "",
             f"`python bench/speed.py --lengths {args.lengths} --repeats {args.repeats} --decode {args.decode}`; "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}. Each repetition runs every model once, interleaved; median (min–max) seconds, "
             "and the median relative to stock. Decode: greedy steps after the prefill, with the cache.", ""]
    for length in [int(n) for n in args.lengths.split(",")]:
        ids = torch.tensor([text_ids[:length]])
        times = {name: ([], [], 0) for name in models}
        for repeat in range(args.repeats):
            for name, model in models.items():
                prefill, decode, kv_bytes = run_once(model, ids, args.decode)
                times[name][0].append(prefill)
                times[name][1].append(decode)
                times[name] = (times[name][0], times[name][1], kv_bytes)
                print(f"{length} #{repeat} {name}: prefill {prefill:.2f} s, decode {decode:.2f} s", flush=True)
        base_prefill = statistics.median(times["stock transformers"][0])
        base_decode = statistics.median(times["stock transformers"][1])
        base_bytes = times["stock transformers"][2]
        lines += [f"## {length} tokens", "",
                  "| model | KV kept | prefill s | prefill vs stock | decode s | decode vs stock |",
                  "|---|---|---|---|---|---|"]
        for name, (prefill, decode, kv_bytes) in times.items():
            lines.append(f"| {name} | {kv_bytes / base_bytes:.1%} | {summary(prefill)} | "
                         f"{statistics.median(prefill) / base_prefill:.3f}× | {summary(decode)} | "
                         f"{statistics.median(decode) / base_decode:.3f}× |")
        lines.append("")
        (ROOT / "bench" / "results" / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
