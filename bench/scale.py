"""Peak memory of a conversion, by model size and layer count: does it scale with one layer?

    python bench/scale.py                 # demo model, and random llamas of 16 and 32 layers (hidden 1024)
    python bench/scale.py --llama-7b      # also a random Llama-2-7B-shaped checkpoint (13 GB of bf16 on disk)
    python bench/scale.py --every-recipe --llama-7b   # every recipe on the 7B shape, the self-generated calibration
                                                      # path, upcycling it, and AdaMoE on 4 layers of Mixtral's shape

Conversions: KVSharer (8 sharing layers) and MatryoshkaKV (--kv-fraction 0.5 --uniform), 8 samples × 64 tokens of
calibration. On the demo model it also measures `surgery adapt` with the teacher sharing the student's weights
against `--copy-teacher`.

Each conversion runs in its own process; its peak anonymous memory (RssAnon, sampled from /proc 20 times a
second) and its peak RSS (ru_maxrss, which also counts memory-mapped shard pages) are reported with the wall time.
Random checkpoints are written in bfloat16, sharded as Hub checkpoints are, and deleted afterwards. Calibration
text comes from a file (Python's reference manual), so no recipe needs the whole model in memory.
Writes bench/results/scale.md.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("SURGERY_SCALE_DIR", "/tmp/surgery-scale"))


def random_llama(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int) -> Path:
    """A random llama checkpoint in bf16, sharded (1 GiB shards), with the demo model's tokenizer."""
    from transformers import LlamaConfig

    from surgery.checkpoint.sources import resolve
    from surgery.checkpoint.tensor_io import ShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    demo = resolve("demo").folder
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, folder / name)
    generator = torch.Generator().manual_seed(layers)
    writer = ShardWriter(folder, 1024**3)
    head_dim = hidden // heads

    def add(name, *shape, scale=0.02):
        writer.add(name, (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16))

    add("model.embed_tokens.weight", 49152, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", heads * head_dim, hidden)
        add(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden)
        add(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden)
        add(p + "self_attn.o_proj.weight", hidden, heads * head_dim)
        add(p + "mlp.gate_proj.weight", intermediate, hidden)
        add(p + "mlp.up_proj.weight", intermediate, hidden)
        add(p + "mlp.down_proj.weight", hidden, intermediate)
        writer.add(p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    add("lm_head.weight", 49152, hidden)
    writer.finish()
    return folder


def random_mixtral(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                   experts: int = 8) -> Path:
    """A random Mixtral-shaped checkpoint in bf16 (8 experts, top-2), sharded, with the demo model's tokenizer."""
    from transformers import MixtralConfig

    from surgery.checkpoint.sources import resolve
    from surgery.checkpoint.tensor_io import ShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    demo = resolve("demo").folder
    MixtralConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
                  num_experts_per_tok=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False, dtype="bfloat16").save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, folder / name)
    generator = torch.Generator().manual_seed(layers)
    writer = ShardWriter(folder, 1024**3)
    head_dim = hidden // heads

    def add(name, *shape, scale=0.02):
        writer.add(name, (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16))

    add("model.embed_tokens.weight", 49152, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", heads * head_dim, hidden)
        add(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden)
        add(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden)
        add(p + "self_attn.o_proj.weight", hidden, heads * head_dim)
        add(p + "block_sparse_moe.gate.weight", experts, hidden, scale=0.5)
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            add(q + "w1.weight", intermediate, hidden)
            add(q + "w3.weight", intermediate, hidden)
            add(q + "w2.weight", hidden, intermediate)
        writer.add(p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    add("lm_head.weight", 49152, hidden)
    writer.finish()
    return folder


def interpreter_mib() -> float:
    """RssAnon of a process that has imported what every conversion imports."""
    code = ("import surgery.pipelines.convert, surgery.cli.main\n"
            "print([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout) / 1024


def measure(args: list[str]) -> dict:
    """Run `surgery ARGS` in a child process; its peak RssAnon, peak RSS, wall time and logged stage times."""
    command = [sys.executable, "-m", "surgery", *args]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TQDM_DISABLE": "1"})
    peak_anon = [0]

    def sample():
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {stderr.strip().splitlines()[-1:]}")
    stages = re.findall(r"stage (.+?): ([\d.]+) s", stderr)
    return {"anon_mib": peak_anon[0] / 1024, "rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start,
            "stages": "; ".join(f"{name} {float(seconds):.0f} s" for name, seconds in stages)}


SAMPLES, TOKENS, VOCAB = 8, 64, 49152


def formula_mib(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head: bool = False,
                vocab: int = VOCAB, samples: int = SAMPLES, tokens: int = TOKENS) -> tuple[float, float]:
    """(one layer in fp32, expected peak above the interpreter): one layer + the embeddings (+ the output head for
    a KL search), all fp32, + the kept activations (the hidden states entering every layer and every layer's K/V,
    for the calibration tokens) + the largest tensor in flight while writing (the embeddings, in the shard dtype)."""
    head_dim = hidden // heads
    layer = (hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate) * 4
    activations = layers * samples * tokens * (hidden + 2 * kv_heads * head_dim) * 4
    embeddings = vocab * hidden * 4 * (2 if head else 1)
    return layer / 2**20, (layer + embeddings + activations) / 2**20


def adapt_memory(calib: Path) -> list[tuple[str, dict]]:
    """`surgery adapt` on a demo KVSharer checkpoint, the teacher sharing the student's tensors or a full copy."""
    checkpoint = WORK / "demo-kvsharer"
    subprocess.run([sys.executable, "-m", "surgery", "-q", "convert", "demo", "--recipe", "kvsharer", "--share-layers",
                    "7", "--calib", str(calib), "--no-verify", "--overwrite", "--out", str(checkpoint)], check=True)
    train = ["adapt", str(checkpoint), "--teacher", "demo", "--steps", "3", "--batch-size", "2", "--seq-len", "64",
             "--num-samples", "8", "--data", str(calib), "--save-every", "0", "--no-verify", "--overwrite",
             "--out", str(WORK / "adapted")]
    rows = []
    for label, extra in (("shares the student's tensors (default)", []), ("own copy (--copy-teacher)", ["--copy-teacher"])):
        rows.append((label, measure([*train, *extra])))
        print("adapt", label, rows[-1][1], flush=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.rmtree(WORK / "adapted", ignore_errors=True)
    return rows


KEEP = ["--keep", "0.2", "--keep-at-least", "0"]
EVERY_RECIPE = [  # (label, options): every registered recipe at its default or paper setting
    ("kvsharer", ["--recipe", "kvsharer", "--share-layers", "L/4", "--threshold", "-1"]),
    ("matryoshka --uniform", ["--recipe", "matryoshka", "--kv-fraction", "0.5", "--uniform"]),  # the search: hours at 7B on CPU
    ("pod", ["--recipe", "pod"]),  # calibrated on 2 × 1,024 tokens, its minimum
    ("attention-gate", ["--recipe", "attention-gate"]),
    ("modification", ["--recipe", "modification"]),
    ("snapkv", ["--recipe", "snapkv", *KEEP]), ("pyramid", ["--recipe", "pyramid", *KEEP]),
    ("zigzag --calibrated", ["--recipe", "zigzag", *KEEP, "--calibrated"]), ("dynamickv", ["--recipe", "dynamickv", *KEEP]),
    ("streamingllm", ["--recipe", "streamingllm", *KEEP]), ("h2o", ["--recipe", "h2o", *KEEP]),
    ("lesa", ["--recipe", "lesa", "--target-layers", "+2"]), ("depth-up", ["--recipe", "depth-up", "--target-layers", "+2"]),
    ("upcycle", ["--recipe", "upcycle"]),
]


def replaced(options: list[str], changes: dict[str, str]) -> list[str]:
    """`options` with the values of some flags changed, e.g. {"--calib": "self-generated"}."""
    out = list(options)
    for flag, value in changes.items():
        out[out.index(flag) + 1] = value
    return out


def every_recipe(folder: Path, layers: int, common: list[str], size: str) -> list[tuple]:
    """Each recipe converting `folder`, and the self-generated calibration path (KVSharer, 8 × 64 tokens)."""
    rows = []
    sizes = {"+2": str(layers + 2), "L/4": str(max(1, layers // 4))}
    runs = [(label, [sizes.get(opt, opt) for opt in options], common) for label, options in EVERY_RECIPE if label != "pod"]
    runs.append(("pod", ["--recipe", "pod"], replaced(common, {"--seq-len": "1024", "--num-samples": "2"})))
    runs.append(("kvsharer, self-generated calibration", ["--recipe", "kvsharer", "--share-layers", sizes["L/4"],
                                                           "--threshold", "-1"],
                 replaced(common, {"--calib": "self-generated"})))
    for label, options, calibration in runs:
        try:
            result = measure(["convert", str(folder), *options, *calibration, "--out", str(WORK / "out")])
        except RuntimeError as error:
            result = {"anon_mib": float("nan"), "rss_mib": float("nan"), "seconds": 0, "stages": f"failed: {error}"}
        rows.append((size, label, "bf16, 1 GiB shards", float("nan"), float("nan"), result))
        print(size, label, result, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-7b", action="store_true")
    parser.add_argument("--every-recipe", action="store_true", help="every recipe on the largest shape, and AdaMoE")
    parser.add_argument("--shape", default=None, help="LAYERS,HIDDEN,INTERMEDIATE,HEADS,KV_HEADS: only this one")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.md")
    args = parser.parse_args()
    from surgery.calibrate.text import heldout_text

    WORK.mkdir(parents=True, exist_ok=True)
    baseline = interpreter_mib()
    calib = WORK / "calib.txt"
    calib.write_text(heldout_text())
    common = ["--num-samples", str(SAMPLES), "--seq-len", str(TOKENS), "--no-verify", "--overwrite", "--calib", str(calib)]
    recipes = [("kvsharer", ["--recipe", "kvsharer", "--share-layers", "8", "--threshold", "-1"], False),
               ("matryoshka --uniform", ["--recipe", "matryoshka", "--kv-fraction", "0.5", "--uniform"], True)]
    rows = []
    if args.every_recipe:
        return every_recipe_table(args, common, baseline)
    demo_runs = [("demo, self-generated calibration", "kvsharer",
                  ["demo", "--recipe", "kvsharer", "--share-layers", "7", *common[:-2]], False)]
    demo_runs += [("demo", label, ["demo", *recipe, *common], head) for label, recipe, head in recipes]
    for label, recipe, run, head in demo_runs:
        result = measure(["convert", *run, "--out", str(WORK / "out")])
        rows.append((label, recipe, "135M, 30 layers, fp32", *formula_mib(30, 576, 1536, 9, 3, head), result))
        print(label, recipe, result, flush=True)
    adapt_rows = adapt_memory(calib)
    shapes = [(16, 1024, 2816, 16, 16), (32, 1024, 2816, 16, 16)]
    if args.llama_7b:
        shapes.append((32, 4096, 11008, 32, 32))
    for layers, hidden, intermediate, heads, kv_heads in shapes:
        folder = random_llama(WORK / f"llama-{layers}x{hidden}", layers, hidden, intermediate, heads, kv_heads)
        size = f"random llama, {layers} layers × hidden {hidden}"
        try:
            for label, recipe, head in recipes:
                result = measure(["convert", str(folder), *recipe, *common, "--out", str(WORK / "out")])
                rows.append((size, label, "bf16, 1 GiB shards",
                             *formula_mib(layers, hidden, intermediate, heads, kv_heads, head), result))
                print(size, label, result, flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(WORK / "out", ignore_errors=True)
    lines = ["# Peak memory of `surgery convert` and `surgery adapt` (CPU)", "",
             "`python bench/scale.py`. Each command runs in its own process: peak anonymous memory (RssAnon, "
             "sampled every 50 ms) and peak RSS (ru_maxrss, which also counts memory-mapped shard pages), wall time, "
             f"and the stage times the command logs. Calibration: {SAMPLES} samples × {TOKENS} tokens from a file "
             "(except the first row); KVSharer with `--threshold -1`, so the search takes exactly the asked layers.", "",
             "Expected above the interpreter: one layer + the embeddings (and the output head for MatryoshkaKV's KL) "
             "in fp32 + the kept activations (hidden states entering each layer and its K/V) on top of the "
             f"interpreter with torch and transformers imported ({baseline:.0f} MiB RssAnon here).", "",
             "| model | recipe | checkpoint | one layer fp32 (MiB) | expected above the interpreter (MiB) | "
             "peak RssAnon (MiB) | peak RSS (MiB) | wall (s) | stages |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {label} | {recipe} | {kind} | {layer:.0f} | {expected:.0f} | {r['anon_mib']:.0f} | "
              f"{r['rss_mib']:.0f} | {r['seconds']:.0f} | {r['stages']} |"
              for label, recipe, kind, layer, expected, r in rows]
    lines += ["", "## `surgery adapt` on the demo model (KVSharer checkpoint, 3 steps of 2 × 64 tokens)", "",
              "| teacher | peak RssAnon (MiB) | peak RSS (MiB) | wall (s) |", "|---|---|---|---|"]
    lines += [f"| {label} | {r['anon_mib']:.0f} | {r['rss_mib']:.0f} | {r['seconds']:.0f} |" for label, r in adapt_rows]
    lines += ["", "The demo model is 513 MiB in float32: one copy of it is what sharing the teacher should save. Read "
              "peak RSS here: transformers maps a float32 safetensors file instead of copying it, so a copied "
              "teacher's weights are file pages (RSS), not anonymous memory (RssAnon).", ""]
    args.out.write_text("\n".join(lines) + "\n")


def every_recipe_table(args, common: list[str], baseline: float) -> None:
    """`--every-recipe`: one row per recipe on the 7B shape (or `--shape`), the self-generated path, and AdaMoE on
    four layers of Mixtral's shape (a full 8×7B does not fit the disk). Target: peak RssAnon under 4 GiB."""
    shape = tuple(int(n) for n in args.shape.split(",")) if args.shape else (32, 4096, 11008, 32, 32)
    layers, hidden, intermediate, heads, kv_heads = shape
    size = f"random llama, {layers} layers × hidden {hidden}"
    folder = random_llama(WORK / f"llama-{layers}x{hidden}", *shape)
    try:
        rows = every_recipe(folder, layers, common, size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    moe_shape = (4, hidden, 14336 if hidden == 4096 else intermediate, heads, 8 if hidden == 4096 else kv_heads)
    moe = random_mixtral(WORK / "mixtral", *moe_shape)
    try:
        result = measure(["convert", str(moe), "--recipe", "adamoe", "--no-verify", "--overwrite",
                          "--out", str(WORK / "out")])
        rows.append((f"random mixtral, 4 layers × hidden {hidden}", "adamoe", "bf16, 1 GiB shards", float("nan"),
                     float("nan"), result))
    finally:
        shutil.rmtree(moe, ignore_errors=True)
        shutil.rmtree(WORK / "out", ignore_errors=True)
    lines = ["# Peak memory of every recipe's conversion (CPU)", "",
             f"`python bench/scale.py --every-recipe{' --shape ' + args.shape if args.shape else ''}`: each conversion "
             "in its own process, peak RssAnon sampled every 50 ms and peak RSS (ru_maxrss, with mapped shard pages); "
             f"calibration {SAMPLES} × {TOKENS} tokens from a file unless the row says otherwise (PoD: 2 × 1024, its "
             f"minimum). Interpreter with torch and transformers imported: {baseline:.0f} MiB RssAnon. Target: peak "
             "RssAnon under 4 GiB.", "",
             "| model | recipe | peak RssAnon (MiB) | peak RSS (MiB) | wall (s) | stages |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {recipe} | {r['anon_mib']:.0f} | {r['rss_mib']:.0f} | {r['seconds']:.0f} | {r['stages']} |"
              for label, recipe, _, _, _, r in rows]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
