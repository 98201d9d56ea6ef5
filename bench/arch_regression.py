"""Logits of every recipe and composition on the demo model, recorded before a refactor of `arch/` and compared after.

    python bench/arch_regression.py --record     # old code: convert each recipe once, save logits
    python bench/arch_regression.py --compare    # new code: same checkpoints, same input; max |diff| per recipe

The input is a left-padded batch of two prompts of real prose (256 and 232 tokens), prefilled with the cache on
(eviction runs), then 8 greedy decode steps. Writes bench/results/arch_regression.md.
"""

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/surgery-arch-regression")
RECIPES = {
    "none": ["--recipe", "none"],
    "kvsharer": ["--recipe", "kvsharer", "--share-layers", "4", "--order", "similar"],
    "matryoshka": ["--recipe", "matryoshka", "--kv-fraction", "0.5", "--uniform"],
    "snapkv": ["--recipe", "snapkv", "--keep", "0.2"],
    "pyramid": ["--recipe", "pyramid", "--keep", "0.2"],
    "zigzag": ["--recipe", "zigzag", "--keep", "0.2"],
    "dynamickv": ["--recipe", "dynamickv", "--keep", "0.2"],
    "kvsharer,matryoshka": ["--recipe", "kvsharer,matryoshka", "--share-layers", "4", "--order", "similar",
                            "--kv-fraction", "0.5", "--uniform"],
    "kvsharer,zigzag": ["--recipe", "kvsharer,zigzag", "--share-layers", "4", "--order", "similar", "--keep", "0.2"],
    "matryoshka,snapkv": ["--recipe", "matryoshka,snapkv", "--kv-fraction", "0.5", "--uniform"],
}
PROMPT, PAD, DECODE = 256, 24, 8


def fixed_input(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    from surgery.calibrate.text import heldout_text

    ids = tokenizer(heldout_text()[20000:60000], add_special_tokens=False)["input_ids"]
    first = torch.tensor(ids[:PROMPT])
    second = torch.tensor(ids[5000 : 5000 + PROMPT - PAD])
    pad = tokenizer.pad_token_id or 0
    batch = torch.stack([first, torch.cat([torch.full((PAD,), pad), second])])
    mask = torch.ones_like(batch)
    mask[1, :PAD] = 0
    return batch, mask


@torch.no_grad()
def run(folder: Path, ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    from surgery.checkpoint.loading import load_model

    model, _ = load_model(str(folder))
    no_cache = model(ids, attention_mask=prompt_mask, use_cache=False).logits
    mask = prompt_mask
    out = model(ids, attention_mask=mask, use_cache=True)
    logits = [out.logits[:, -1:]]
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(DECODE):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        logits.append(out.logits[:, -1:])
    return {"decode": torch.cat(logits, 1).float(), "prefill": no_cache[:, ::16].float()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--only", default=None)
    args = parser.parse_args()
    from surgery.checkpoint.loading import load_tokenizer
    from surgery.checkpoint.sources import resolve

    tokenizer = load_tokenizer(resolve("demo").folder)
    ids, mask = fixed_input(tokenizer)
    names = [n for n in RECIPES if args.only is None or n in args.only.split(";")]
    WORK.mkdir(exist_ok=True)
    if args.record:
        from click.testing import CliRunner

        from surgery.cli.main import main as cli

        for name in names:
            folder = WORK / name.replace(",", "+")
            if not folder.exists():
                started = time.time()
                result = CliRunner().invoke(cli, ["-q", "convert", "demo", *RECIPES[name], "--out", str(folder),
                                                  "--no-verify", "--num-samples", "8", "--seq-len", "64"])
                assert result.exit_code == 0, result.stderr
                print(f"converted {name} in {time.time() - started:.0f} s", flush=True)
            torch.save(run(folder, ids, mask), folder.with_suffix(".ref.pt"))
            print(f"recorded {name}", flush=True)
    if args.compare:
        rows = []
        for name in names:
            folder = WORK / name.replace(",", "+")
            reference = torch.load(folder.with_suffix(".ref.pt"))
            now = run(folder, ids, mask)
            diffs = {key: (now[key] - reference[key]).abs().max().item() for key in reference}
            same_tokens = bool((now["decode"].argmax(-1) == reference["decode"].argmax(-1)).all())
            rows.append((name, diffs["prefill"], diffs["decode"], same_tokens))
            print(name, json.dumps(diffs), same_tokens, flush=True)
        lines = ["# Logits before and after the attention-core refactor (demo model, fp32, CPU)", "",
                 "`python bench/arch_regression.py --record` on the old code, `--compare` on the new. Input: a "
                 f"left-padded batch of 2 prose prompts ({PROMPT} and {PROMPT - PAD} tokens), prefill with eviction, "
                 f"{DECODE} greedy decode steps; prefill logits without cache at every 16th position.", "",
                 "| recipe | max abs diff, prefill (no cache) | max abs diff, decode after eviction | same greedy tokens |",
                 "|---|---|---|---|"]
        lines += [f"| {n} | {p:.2e} | {d:.2e} | {'yes' if s else 'no'} |" for n, p, d, s in rows]
        (ROOT / "bench" / "results" / "arch_regression.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
