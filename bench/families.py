"""KV bytes per token of every recipe and policy on each supported family: a tiny random model per family (the
configs the tests use, `tests/factories.py`), converted with each recipe at the conformance suite's options
(`tests/recipes/cases.py`), then prefilled with one prompt in float32 and measured from the cache's own tensors.
The source row is stock transformers' cache for the same model (sliding layers hold their window there too).

Writes bench/results/families.md. Offline, CPU, about 10 minutes on 2 cores:

    python bench/families.py [--prompt 64] [--families gemma2,phi3]

What it shows is how each recipe's saving lands on each family's layer layout (which layers a recipe acts on, what
a sliding layer keeps), not quality: the models are random.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny family configs, one table
from factories import ALL_FAMILIES, save_tiny  # noqa: E402
from recipes.cases import CALIBRATION, CALIBRATION_OVERRIDES, OPTIONS  # noqa: E402

from surgery.base.errors import SurgeryError  # noqa: E402
from surgery.checkpoint.loading import load_model  # noqa: E402
from surgery.pipelines.convert import ConvertRequest, convert  # noqa: E402
from surgery.recipes import RECIPES  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "families.md"


def stock_bytes_per_token(folder: Path, ids: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(ids, use_cache=True)
    cache = getattr(output, "cache", None) or output.past_key_values
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                 if isinstance(t, torch.Tensor))
    return stored / ids.numel()


def recipe_bytes_per_token(folder: Path, ids: torch.Tensor) -> float:
    model, _ = load_model(str(folder))
    with torch.no_grad():
        output = model(ids, use_cache=True)
    cache = getattr(output, "cache", None) or output.past_key_values
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes() / ids.numel()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor)) / ids.numel()


def convert_one(source: Path, out: Path, recipe: str) -> Path:
    calibration = {**CALIBRATION, **CALIBRATION_OVERRIDES.get(recipe, {})} if RECIPES[recipe].calibration else {}
    request = ConvertRequest(model=str(source), recipes=[RECIPES[recipe](**OPTIONS.get(recipe, {}))], out=out,
                             verify=False, progress=False, **calibration)
    return convert(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--families", default=",".join(ALL_FAMILIES))
    args = parser.parse_args()
    families = args.families.split(",")
    ids = torch.randint(3, 120, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            source = save_tiny(Path(tmp) / family / "source", family, max_position_embeddings=2048)
            base = stock_bytes_per_token(source, ids)
            cells = {"source": f"{base:,.0f}"}
            for recipe in RECIPES:
                try:
                    folder = convert_one(source, Path(tmp) / family / recipe, recipe)
                    measured = recipe_bytes_per_token(folder, ids)
                    cells[recipe] = f"{measured:,.0f} ({measured / base:.2f})"
                except SurgeryError as error:
                    cells[recipe] = "refused: " + str(error)
                print(family, recipe, cells[recipe], flush=True)
            rows[family] = cells
            write(rows, args.prompt)


def write(rows: dict, prompt: int) -> None:
    columns = ["source", *RECIPES]
    lines = [
        "# KV bytes per token, every recipe on every family",
        "",
        f"Tiny random model per family (`tests/factories.py`: 4 layers, 2 KV heads of 16; sliding windows of 6 or 7 "
        f"where the family has them), one prompt of {prompt} tokens, float32, bytes counted from the cache's tensors "
        "after the prefill (`bench/families.py`). Cell: bytes per token (ratio to the source, stock transformers' "
        "cache). Recipes at the conformance suite's options (`tests/recipes/cases.py`): budgets keep 30% "
        "(of the full-attention layers' prompt), KVSharer shares one layer, MatryoshkaKV keeps 50%, PoD at δ = 0 "
        "(every full-attention layer joins a group). Depth growth and upcycling change weights, not the cache per "
        "layer; growth adds layers. A refusal names its reason.",
        "",
        "| family | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    reasons: list[str] = []  # each refusal's line once, as a numbered note under the table

    def cell(text: str) -> str:
        if not text.startswith("refused: "):
            return text
        reason = text.removeprefix("refused: ")
        if reason not in reasons:
            reasons.append(reason)
        return f"refused ({reasons.index(reason) + 1})"

    for family, cells in rows.items():
        lines.append(f"| {family} | " + " | ".join(cell(cells.get(column, "")) for column in columns) + " |")
    lines += ["", "Refusals, as `surgery convert` prints them:", ""]
    lines += [f"{number}. {reason}" for number, reason in enumerate(reasons, 1)]
    missing = [family for family in ALL_FAMILIES if family not in rows]
    if missing:
        lines += ["", f"Missing rows: {', '.join(missing)} (not run in this invocation)."]
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
