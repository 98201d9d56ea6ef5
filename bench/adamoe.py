"""AdaMoE null experts on the upcycled demo model (SmolLM2-135M-Instruct, every other MLP → 4 experts, top-2):
true experts per token, MLP FLOPs per token, held-out perplexity and decode speed, before and after `surgery adapt`,
against the plain top-2 model trained for the same number of steps.

    python bench/adamoe.py [--warmup 80] [--steps 120] [--batch-size 2] [--work DIR] [--resume]

1. `surgery convert demo --recipe upcycle --moe-train experts`: 15 MLPs (layers 1, 3, ..., 29) become 4 copies each
   behind a new router; exact at the start.
2. Warm-up: `surgery adapt` for --warmup steps, so that the experts part (the upcycled model, "before").
3. Baseline: the warm model trained --steps more steps with plain top-2 routing.
4. AdaMoE: `surgery convert <warm model> --recipe adamoe` (8 null experts per layer, top-4, the paper's doubling),
   then --steps steps of `surgery adapt` on the same batches as the baseline.
Both runs train the routers and experts of the MoE layers (`--moe-train experts`), 2 × 512-token sequences per step
from the calibration corpus (stdlib docstrings), cross-entropy plus the load-balancing loss with one weight,
--balance-coef (1e-4, AdaMoE's paper's), for the warm-up, the baseline and AdaMoE alike. Perplexity: 4,096 tokens of Python's reference
manual prose in 512-token windows, which training never reads. Experts per token and MLP FLOPs: counted from the
tokens each expert actually ran over those windows. Writes bench/results/adamoe.md and adamoe.json.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from longctx import work_folder
from speed import interleaved_timing
from surgery.adapt.engine import AdaptSettings, adapt
from surgery.arch.configuration_surgery import SurgeryConfig
from surgery.calibrate.text import heldout_text
from surgery.metrics.compute import expert_blocks, measured_compute, reset_counts
from surgery.calibrate.source_model import load_calibration_model
from surgery.pipelines.convert import ConvertRequest, convert
from surgery.evals.evaluate import perplexity
from surgery.checkpoint.families import surgery_config_from_source
from surgery.checkpoint.loading import load_model
from surgery.recipes.adamoe import AdaMoE
from surgery.recipes.upcycle import Upcycle
from surgery.checkpoint.sources import resolve

RESULTS = Path(__file__).parent / "results"
WINDOW = 512
PAPER = ("Paper (Zeng et al., Mixtral-8x7B fine-tuned with 16 null experts and top-4): −14.5% FLOPs with +1.69% "
         "accuracy on ARC-C.")
ROWS = ("dense source", "upcycled (before)", "adamoe (before)", "top-2 (after)", "adamoe (after)")


def load_measured(path: str):
    """A model whose MoE blocks count what they run: plain family checkpoints in the surgery architecture."""
    source = resolve(path)
    if source.model_type in (SurgeryConfig.model_type, "llama"):
        return load_model(path)[0]
    return load_calibration_model(source, surgery_config_from_source(source.config))


def true_expert_histogram(model, ids: torch.Tensor, top_k: int) -> list[float]:
    """Share of (token, MoE layer) pairs that ran 0, 1, ..., k true experts, from the routers' choices."""
    counts = torch.zeros(top_k + 1)

    def hook(block, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        _, chosen = block.route(x)
        counts.add_(torch.bincount((chosen < len(block.experts)).sum(-1), minlength=top_k + 1)[: top_k + 1].float())

    handles = [block.register_forward_pre_hook(hook) for block in expert_blocks(model).values()]
    with torch.no_grad():
        for start in range(0, ids.shape[1] - WINDOW + 1, WINDOW):
            model(ids[:, start:start + WINDOW], use_cache=False)
    for handle in handles:
        handle.remove()
    return (counts / counts.sum()).tolist()


def expert_divergence(model) -> float | None:
    """Mean over MoE layers and expert pairs of ‖W_i − W_j‖ / ‖W_j‖ (each expert's three projections together):
    0 for identical copies."""
    values = []
    for block in expert_blocks(model).values():
        flat = [torch.cat([p.detach().flatten() for p in expert.parameters()]) for expert in block.experts]
        values += [((a - b).norm() / b.norm()).item() for i, a in enumerate(flat) for b in flat[i + 1:]]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def measure(path: str, ids: torch.Tensor) -> dict:
    model = load_measured(path).eval()
    reset_counts(model)
    row = {"ppl": perplexity(model, ids, WINDOW, WINDOW)}
    compute = measured_compute(model)
    if compute:
        row.update(experts=compute["experts_per_token"], mlp_flops=compute["mlp_flops_per_token"],
                   flops=compute["flops_per_token"],
                   per_layer={str(k): v for k, v in compute["experts_per_layer"].items()},
                   histogram=true_expert_histogram(model, ids, model.config.moe_top_k),
                   divergence=expert_divergence(model))
    else:  # the dense source: one MLP per layer
        from surgery.metrics.compute import dense_mlp_flops, layer_matmul_flops

        config = model.config
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        row.update(mlp_flops=config.num_hidden_layers * dense_mlp_flops(config),
                   flops=config.num_hidden_layers * layer_matmul_flops(config))
    return row


def render(state: dict, results: Path) -> None:
    meta, rows = state["meta"], state["rows"]
    lines = ["# AdaMoE on the upcycled SmolLM2-135M-Instruct", "",
             f"Generated by `python bench/adamoe.py` on {platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, float32, CPU.", "",
             "- Model: SmolLM2-135M-Instruct with the MLPs of layers 1, 3, ..., 29 upcycled to 4 experts, top-2 "
             "(`--recipe upcycle`), warmed up for "
             f"{meta['warmup']} `surgery adapt` steps so the experts part (\"before\").",
             f"- Then {meta['steps']} more steps for each of: plain top-2 (baseline), and AdaMoE with 8 null experts "
             "and top-4 (`--recipe adamoe` on the warm model). Both train the routers and experts of the MoE layers, "
             f"{meta['batch']} × 512 tokens a step of the calibration corpus (stdlib docstrings), the same batches, "
             "cross-entropy + load-balancing loss " + (f"weighted {meta['balance_coef']} for all" if "balance_coef" in meta
                                                      else "weighted 0.01 for top-2 and 1e-4 for AdaMoE (an earlier "
                                                           "protocol: not like for like)") + ".",
             f"- Perplexity: {meta['eval_tokens']:,} tokens of Python's reference manual prose (`pydoc_data.topics`, "
             "never trained on) in 512-token windows. True experts per token and MLP FLOPs per token: counted from the "
             "tokens each expert ran over those windows (15 MoE layers; router and expert matmuls, the 15 dense MLPs "
             "included in the MLP column; the FLOPs column adds the q/k/v/o projections of all 30 layers).",
             f"- Speed: a {meta.get('speed_prompt', '?')}-token prompt of the held-out text, prefill, then "
             f"{meta.get('speed_decode', '?')} greedy decode steps; median of {meta.get('speed_repeats', '?')} interleaved "
             "repeats, all models in the surgery architecture except the dense source (stock transformers).", "",
             "| model | true experts / token (MoE layers) | tokens using 0 / 1 / 2 / 3 / 4 true experts | MLP FLOPs / token "
             "| FLOPs / token | held-out ppl | prefill s | decode tok/s | expert divergence | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        row = rows.get(name)
        if row is None:
            lines.append(f"| {name} | not run (time) |" + " |" * 9)
            continue
        hist = row.get("histogram")
        speed = row.get("speed", {})
        cells = [name, f"{row['experts']:.3f}" if "experts" in row else "- (dense)",
                 " / ".join(f"{v:.1%}" for v in hist) if hist else "-",
                 f"{row['mlp_flops'] / 1e6:.1f} M", f"{row['flops'] / 1e6:.1f} M", f"{row['ppl']:.3f}",
                 f"{speed['prefill']:.3f}" if speed else "-",
                 f"{meta['speed_decode'] / speed['decode']:.1f}" if speed else "-",
                 f"{row['divergence']:.4f}" if row.get("divergence") is not None else "-",
                 f"{row['train_s']:.0f}" if "train_s" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    before, after = rows.get("top-2 (after)"), rows.get("adamoe (after)")
    if before and after:
        lines += ["", f"After {meta['steps']} steps, AdaMoE against plain top-2: MLP FLOPs per token "
                  f"{after['mlp_flops'] / before['mlp_flops'] - 1:+.1%}, all projection and MLP FLOPs "
                  f"{after['flops'] / before['flops'] - 1:+.1%}, true experts per token {after['experts']:.3f} vs "
                  f"{before['experts']:.3f}, perplexity {after['ppl']:.3f} vs {before['ppl']:.3f} "
                  f"({after['ppl'] / before['ppl'] - 1:+.1%})."]
        if before.get("speed") and after.get("speed"):
            lines[-1] += (f" Decode {before['speed']['decode'] / after['speed']['decode']:.2f}× the top-2 model's "
                          "speed.")
        per_layer = after.get("per_layer", {})
        if per_layer:
            lines += ["", "AdaMoE true experts per token by layer (after): " +
                      ", ".join(f"L{k} {v:.2f}" for k, v in per_layer.items()) + "."]
    lines += ["", "Expert divergence: mean over layers and expert pairs of ‖W_i − W_j‖ / ‖W_j‖ (0 = identical copies, "
              "as upcycling starts); the experts part only through training (no --noise).", "", PAPER, ""]
    (results / "adamoe.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=80)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--balance-coef", type=float, default=1e-4,
                        help="one load-balancing weight for the warm-up, the top-2 baseline and AdaMoE alike "
                             "(AdaMoE's paper's; the upcycling recipe alone defaults to 0.01)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--speed-prompt", type=int, default=256)
    parser.add_argument("--speed-decode", type=int, default=32)
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    state_path = args.results / "adamoe.json"
    state = json.loads(state_path.read_text()) if args.resume and state_path.exists() else {"rows": {}, "meta": {}}
    source = resolve("demo")
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    ids = torch.tensor([tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][: args.eval_tokens]])
    state["meta"].update(warmup=args.warmup, steps=args.steps, batch=args.batch_size, eval_tokens=ids.shape[1],
                         speed_prompt=args.speed_prompt, speed_decode=args.speed_decode, speed_repeats=args.speed_repeats,
                         balance_coef=args.balance_coef)
    rows = state["rows"]

    def save() -> None:
        state_path.write_text(json.dumps(state, indent=1))
        render(state, args.results)

    def train(checkpoint: Path, out: Path, steps: int, seed: int) -> float:
        settings = AdaptSettings(teacher="demo", steps=steps, batch_size=args.batch_size, seed=seed,
                                 num_samples=steps * args.batch_size, save_every=0)
        start = time.perf_counter()
        adapt(checkpoint, out, settings, verify=False, progress=True, overwrite=True)
        return time.perf_counter() - start

    with work_folder(args.work, "adamoe-bench-") as work:
        paths = {"dense source": "demo", "upcycled (before)": str(work / "warm"),
                 "adamoe (before)": str(work / "adamoe"), "top-2 (after)": str(work / "top2-trained"),
                 "adamoe (after)": str(work / "adamoe-trained")}
        if "dense source" not in rows:
            rows["dense source"] = measure("demo", ids)
            save()
        if "upcycled (before)" not in rows:
            convert(ConvertRequest(model="demo", recipes=[Upcycle(moe_train="experts", balance_coef=args.balance_coef)],
                                   out=work / "upcycled",
                                   verify=False, overwrite=True, progress=False))
            warm_s = train(work / "upcycled", work / "warm", args.warmup, seed=0)
            rows["upcycled (before)"] = {**measure(paths["upcycled (before)"], ids), "train_s": warm_s}
            save()
        if "top-2 (after)" not in rows:
            seconds = train(work / "warm", work / "top2-trained", args.steps, seed=1)
            rows["top-2 (after)"] = {**measure(paths["top-2 (after)"], ids), "train_s": seconds}
            save()
        if "adamoe (before)" not in rows:
            convert(ConvertRequest(model=str(work / "warm"), recipes=[AdaMoE(balance_coef=args.balance_coef)],
                                   out=work / "adamoe", verify=False,
                                   overwrite=True, progress=False))
            rows["adamoe (before)"] = measure(paths["adamoe (before)"], ids)
            save()
        if "adamoe (after)" not in rows:
            seconds = train(work / "adamoe", work / "adamoe-trained", args.steps, seed=1)
            rows["adamoe (after)"] = {**measure(paths["adamoe (after)"], ids), "train_s": seconds}
            save()
        prompt = ids[:, : args.speed_prompt]
        models = {name: load_measured(path).eval() for name, path in paths.items()}
        speeds = interleaved_timing(models, prompt, args.speed_decode, args.speed_repeats)
        for name, speed in speeds.items():
            rows[name]["speed"] = speed
        save()
        print((args.results / "adamoe.md").read_text())


if __name__ == "__main__":
    main()
