"""Golden outputs of every recipe on tiny random models, to show that a refactor changes no behaviour.

`python bench/golden.py record OUT.pt` converts each registered recipe through the CLI (a fresh process each), loads
the checkpoint with `trust_remote_code=True` as users do, and records: the full-forward logits of a left-padded
batch, the logits of incremental decoding after a prefill, the cache's measured K/V bytes after that prefill, and
the same again after the gate and router weights are redrawn (so learned eviction and routing really act).
`python bench/golden.py compare A.pt B.pt` prints the largest difference per recipe and exits non-zero on any.

Only the CLI and the exported checkpoint are used, so the script runs unchanged before and after a move of modules.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

CALIBRATION = ["--num-samples", "4", "--seq-len", "32", "--seed", "3"]
BUDGET = ["--keep", "0.3", "--keep-at-least", "0", "--window", "4"]
RECIPES = {  # recipe -> (source family, options)
    "none": ("llama", []),
    "kvsharer": ("llama", ["--share-layers", "2", "--threshold", "-1"]),
    "matryoshka": ("llama", ["--kv-fraction", "0.5", "--search-samples", "2", "--search-len", "16"]),
    "pod": ("llama", ["--seq-len", "1024", "--num-samples", "2", "--sinks", "2", "--recent", "8", "--delta", "0", "--last-queries", "8"]),
    "attention-gate": ("llama", []),
    "modification": ("llama", []),
    "snapkv": ("llama", BUDGET),
    "pyramid": ("llama", BUDGET),
    "zigzag": ("llama", BUDGET),
    "dynamickv": ("llama", BUDGET),
    "lesa": ("llama", ["--target-layers", "8", "--predictor-epochs", "1", "--predictor-width", "16"]),
    "depth-up": ("llama", ["--target-layers", "8"]),
    "upcycle,snapkv": ("llama", BUDGET),  # alone it writes a plain Qwen2-MoE, which cannot hold attention biases
    "adamoe": ("qwen2_moe", []),
    "kvsharer,snapkv": ("llama", ["--share-layers", "2", "--threshold", "-1", *BUDGET]),
}


def tiny(folder: Path, family: str) -> Path:
    extras = {"llama": {"attention_bias": True},
              "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                            "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2}}[family]
    config = AutoConfig.for_model(family, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  tie_word_embeddings=False, **extras)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def cache_of(output):
    return getattr(output, "cache", None) or output.past_key_values


def kv_bytes(cache) -> int:
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def measure(model) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (2, 72), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    full = model(ids, attention_mask=mask).logits
    prompt = 64
    out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    cache, steps = cache_of(out), [out.logits[:, -1]]
    prefill_bytes = kv_bytes(cache)
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)
        cache = cache_of(out)
        steps.append(out.logits[:, -1])
    return {"full": full.float(), "decode": torch.stack(steps, 1).float(), "kv_bytes": torch.tensor(prefill_bytes)}


def record(out: Path) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        sources = {family: tiny(root / family, family) for family in ("llama", "qwen2_moe")}
        for recipe, (family, options) in RECIPES.items():
            folder = root / recipe.replace(",", "_").replace("-", "_")
            calibration = [] if recipe in ("upcycle,snapkv", "adamoe") else CALIBRATION  # they calibrate on nothing
            command = [sys.executable, "-m", "surgery", "-q", "convert", str(sources[family]), "--recipe", recipe,
                       "--out", str(folder), "--no-verify", *calibration, *options]
            subprocess.run(command, check=True, capture_output=True)
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
            row = measure(model)
            torch.manual_seed(11)
            with torch.no_grad():  # gates and routers that really evict and route
                for name, parameter in model.named_parameters():
                    if ".router." in name or ".self_attn.gate." in name or name.endswith("mlp.gate.weight"):
                        parameter.normal_(0, 1.0)
            row.update({f"redrawn_{key}": value for key, value in measure(model).items()})
            results[recipe] = row
            print(f"{recipe}: kv_bytes {int(row['kv_bytes'])}, redrawn {int(row['redrawn_kv_bytes'])}", flush=True)
    torch.save(results, out)


def compare(a: Path, b: Path) -> int:
    before, after = torch.load(a), torch.load(b)
    worst = 0.0
    for recipe in before:
        if recipe not in after:
            print(f"{recipe}: missing")
            worst = float("inf")
            continue
        diffs = {key: float((before[recipe][key].double() - after[recipe][key].double()).abs().max())
                 for key in before[recipe]}
        worst = max(worst, *diffs.values())
        print(f"{recipe}: " + ", ".join(f"{key} {value:.2e}" for key, value in diffs.items()))
    print(f"largest difference: {worst:.3e}")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(Path(sys.argv[2]))
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
