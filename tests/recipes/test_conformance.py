"""The conformance suite: every registered recipe and policy, on every family it supports, passes the same checks.
A new recipe gets all of them by being registered (`surgery/recipes/__init__.py`), as kvpress runs every press
through `default_presses`.

Each family's conversions are made once per session; one fresh interpreter per family, which cannot import
surgery, loads every checkpoint of that family with stock transformers and runs it, so what is measured is what a
user downloads. Replay runs on llama only.
"""

import json
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cases import CALIBRATION, CALIBRATION_OVERRIDES, OPTIONS, ZERO_STRENGTH
from factories import ALL_FAMILIES, save_tiny
from helpers import assert_clean_failure, cli, run_convert
from surgery.base.errors import SurgeryError
from surgery.recipes import RECIPES

pytestmark = pytest.mark.slow
FAMILIES = ALL_FAMILIES
PROMPT, TOTAL = 40, 46  # prefill 40 tokens, then decode 6 one at a time
MAX_POSITIONS = 2048

# Runs in the child: stock transformers and each checkpoint's own code; surgery cannot be imported.
CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["surgery"] = None
    import torch
    from transformers import AutoModelForCausalLM

    def cache_of(output):
        return getattr(output, "cache", None) or output.past_key_values

    def stored_bytes(cache):
        if hasattr(cache, "kv_bytes"):
            return int(cache.kv_bytes())
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    def held(cache):
        layers = []
        for layer in cache.layers:
            layers.append(list(layer.held_tokens()) if hasattr(layer, "held_tokens") and layer.values is not None
                          else None)
        return layers

    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    ids = torch.randint(3, 120, (1, %(total)d), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, folder in cases.items():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
            with torch.no_grad():
                full = model(ids).logits
                prefill = model(ids[:, :%(prompt)d], use_cache=True)
                cache = cache_of(prefill)
                kv_bytes, kept = stored_bytes(cache), held(cache)
                steps = [prefill.logits[:, -1]]
                for t in range(%(prompt)d, %(total)d):
                    out_t = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                    cache = cache_of(out_t)
                    steps.append(out_t.logits[:, -1])
                chunk_cache = cache_of(model(ids[:, :%(prompt)d], use_cache=True))
                chunk = model(ids[:, %(prompt)d:], past_key_values=chunk_cache, use_cache=True).logits
                generated = model.generate(ids[:, :8], max_new_tokens=3, do_sample=False)
            results[name] = {"full": full[0].tolist(), "decode": torch.stack(steps, 1)[0].tolist(),
                             "chunk": chunk[0].tolist(), "kv_bytes": kv_bytes, "held": kept,
                             "generated": generated.shape[1], "module": type(model).__module__}
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    with open(out, "w") as handle:
        json.dump(results, handle)
""") % {"prompt": PROMPT, "total": TOTAL}


def convert_case(source: Path, out: Path, recipe: str, options: dict) -> tuple[str, object]:
    """("ok", folder) or ("refused", message)."""
    calibration = {**CALIBRATION, **CALIBRATION_OVERRIDES.get(recipe, {})}
    calibrates = RECIPES[recipe].calibration is not None
    try:
        return "ok", run_convert(source, out, recipe, recipe_options=options, **(calibration if calibrates else {}))
    except SurgeryError as error:
        return "refused", str(error)


@pytest.fixture(scope="session")
def family_runs(tmp_path_factory):
    """Per family: every recipe converted (or refused), and what a fresh interpreter measured on each."""
    cache = {}

    def run(family: str) -> dict:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"conformance-{family}")
            source = save_tiny(root / "source", family, max_position_embeddings=MAX_POSITIONS)
            outcomes = {name: convert_case(source, root / name, name, OPTIONS.get(name, {})) for name in RECIPES}
            folders = {name: str(value) for name, (state, value) in outcomes.items() if state == "ok"}
            subprocess.run([sys.executable, "-c", CHILD, json.dumps(folders), str(root / "measured.json")],
                           check=True, capture_output=True, text=True)
            cache[family] = {"outcomes": outcomes, "measured": json.loads((root / "measured.json").read_text())}
        return cache[family]

    return run


CASES = [(recipe, family) for recipe in RECIPES for family in FAMILIES]


def converted(family_runs, recipe: str, family: str) -> dict:
    run = family_runs(family)
    state, value = run["outcomes"][recipe]
    if state == "refused":
        pytest.skip(f"{recipe} refuses {family}: {value}")
    return {"folder": Path(value), **run["measured"][recipe]}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_converts_on_some_family_and_refuses_others_in_one_line(recipe, family_runs):
    outcomes = {family: family_runs(family)["outcomes"][recipe] for family in FAMILIES}
    assert any(state == "ok" for state, _ in outcomes.values()), outcomes
    for family, (state, message) in outcomes.items():
        if state == "refused":
            assert "\n" not in message and "(" in message, (family, message)  # one line, with its fix


@pytest.mark.parametrize("recipe,family", CASES)
def test_loads_and_generates_without_surgery(recipe, family, family_runs):
    case = converted(family_runs, recipe, family)
    assert "error" not in case, case.get("error")
    assert case["generated"] == 11
    config = json.loads((case["folder"] / "config.json").read_text())
    if config["model_type"] == "surgery":  # the checkpoint's own flat code ran, not an installed package
        assert case["module"].startswith("transformers_modules")


def evicts(case: dict) -> bool:
    return any(layer is not None and layer[0] < layer[1] for layer in case["held"])


@pytest.mark.parametrize("recipe,family", CASES)
def test_incremental_decoding_equals_a_full_forward(recipe, family, family_runs):
    """Token by token through the cache equals one forward over the whole sequence; after eviction, equals one
    forward over the rest of the sequence on the same evicted cache."""
    case = converted(family_runs, recipe, family)
    decode = torch.tensor(case["decode"])
    reference = torch.tensor(case["chunk"]) if evicts(case) else torch.tensor(case["full"])[PROMPT - 1 :]
    if evicts(case):
        decode = decode[1:]
    assert (decode - reference).abs().max() < 1e-4


def planned_kv_bytes(config: dict, case: dict, n: int = PROMPT) -> int:
    """The K/V bytes the plan in config.json says a prefill of n tokens leaves, written from the plan's fields: a
    sharing layer holds nothing, a projected head its ranks, a PoD borrowing head only its proximal keys, an
    evicting layer its budget (the counts the policy chose, whose total the budget fixes), a sliding-window layer
    its last window − 1 tokens."""
    item = 4  # float32
    if config["model_type"] != "surgery":  # a plain family checkpoint, as stock transformers caches it
        kv_heads = config["num_key_value_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        window = config.get("sliding_window")
        types = config.get("layer_types") or ["sliding_attention" if window else "full_attention"] * config["num_hidden_layers"]
        tokens = [min(n, window - 1) if kind == "sliding_attention" else n for kind in types]
        return sum(tokens) * 2 * kv_heads * head_dim * item
    kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
    total = 0
    for layer, source in enumerate(config["kv_source"]):
        if source != layer:
            continue
        sliding = config["layer_types"][layer] == "sliding_attention" and config.get("sliding_window")
        key_widths = (config.get("matryoshka_key_ranks") or [None] * (layer + 1))[layer] or [head_dim] * kv_heads
        value_widths = (config.get("matryoshka_value_ranks") or [None] * (layer + 1))[layer] or [head_dim] * kv_heads
        tokens = min(n, config["sliding_window"] - 1) if sliding else n
        if config.get("kv_policy") and not sliding:
            held, _ = case["held"][layer]
            tokens = held // kv_heads
        borrowing = [h for h, s in enumerate((config.get("pod_key_source") or [[layer] * kv_heads] * (layer + 1))[layer])
                     if s != layer]
        proximal = min(n, config.get("pod_sink_tokens", 0) + config.get("pod_recent_tokens", 0))
        keys = sum(width * (proximal if h in borrowing else tokens) for h, width in enumerate(key_widths))
        total += (keys + sum(value_widths) * tokens) * item
        if config.get("attention_gate_heads") and not sliding:  # a gate keeps its own K/V of every token it saw
            total += 2 * config["attention_gate_heads"] * config["attention_gate_width"] * n * item
    return total


@pytest.mark.parametrize("recipe,family", CASES)
def test_cache_holds_what_the_plan_says(recipe, family, family_runs):
    case = converted(family_runs, recipe, family)
    config = json.loads((case["folder"] / "config.json").read_text())
    assert case["kv_bytes"] == planned_kv_bytes(config, case)
    if config.get("kv_policy"):  # the budget fixes the total across layers: B = keep·n per layer on average
        owners = [layer for layer, source in enumerate(config["kv_source"]) if source == layer
                  and config["layer_types"][layer] != "sliding_attention"]  # sliding layers keep their window
        kept = sum(case["held"][layer][0] for layer in owners) / config["num_key_value_heads"]
        assert abs(kept - round(config["kv_budget"] * PROMPT) * len(owners)) <= len(owners)
        assert evicts(case)


@pytest.mark.parametrize("recipe", [name for name in RECIPES if name in ZERO_STRENGTH])
def test_zero_strength_is_the_identity(recipe, tmp_path):
    """At the options that should change nothing, the checkpoint gives the source's logits (in stock transformers,
    through the family's own class, for a dense or MoE source as the recipe needs)."""
    from transformers import AutoModelForCausalLM

    from helpers import load_remote

    family = "qwen2_moe" if recipe == "adamoe" else "qwen3" if recipe == "upcycle" else "llama"
    extra = {"norm_topk_prob": True} if family == "qwen2_moe" else {}  # a setting a recipe must carry over
    source = save_tiny(tmp_path / "source", family, max_position_embeddings=MAX_POSITIONS, **extra)
    calibration = {**CALIBRATION, **CALIBRATION_OVERRIDES.get(recipe, {})}
    calibrates = RECIPES[recipe].calibration is not None
    out = run_convert(source, tmp_path / "out", recipe, recipe_options=ZERO_STRENGTH[recipe],
                      **(calibration if calibrates else {}))
    ids = torch.randint(3, 120, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (load_remote(out)(ids).logits - reference(ids).logits).abs().max() < 1e-4


REPLAYED = [name for name, cls in RECIPES.items() if cls.calibration is not None]


@pytest.mark.parametrize("recipe", REPLAYED)
def test_recipe_yaml_replays_byte_for_byte_with_its_seed(recipe, tmp_path):
    """A recipe that calibrates or searches, converted with a non-default seed, is reproduced by its recipe.yaml:
    the same weights, byte for byte, and the same config."""
    source = save_tiny(tmp_path / "source", "llama", max_position_embeddings=MAX_POSITIONS)
    calibration = {**CALIBRATION, **CALIBRATION_OVERRIDES.get(recipe, {}), "seed": 5}
    first = run_convert(source, tmp_path / "first", recipe, recipe_options=OPTIONS.get(recipe, {}), **calibration)
    result = cli("convert", "--recipe-file", first / "recipe.yaml", "--out", tmp_path / "again", "--no-verify")
    assert result.exit_code == 0, result.stderr
    again = tmp_path / "again"
    before, after = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert (first / "config.json").read_bytes() == (again / "config.json").read_bytes()


def invalid_values(spec) -> list[str]:
    """Values just outside an option's declared range, or outside its choices."""
    meta, kind = spec.metadata, spec.type
    integer = "int" in str(kind) and "float" not in str(kind)
    step = 1 if integer else 0.5
    values = []
    if "min" in meta:
        values.append(meta["min"] - step)
    if "max" in meta:
        values.append(meta["max"] + step)
    if "above" in meta:
        values.append(meta["above"])
    if "below" in meta:
        values.append(meta["below"])
    if "choices" in meta:
        values.append("not-a-choice")
    return [str(int(v) if integer and not isinstance(v, str) else v) for v in values]


INVALID = [(name, spec.name, value) for name, cls in RECIPES.items() for spec in
           fields(cls) for value in invalid_values(spec)]


@pytest.mark.parametrize("recipe,option,value", INVALID)
def test_each_invalid_option_is_one_line(recipe, option, value, tiny_models, tmp_path):
    flag = "--" + option.replace("_", "-")
    result = cli("convert", tiny_models["llama"], "--recipe", recipe, flag, value, "--out", tmp_path / "out")
    assert_clean_failure(result, flag)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", [name for name, cls in RECIPES.items() if hasattr(cls, "policy")])
def test_a_budget_recipe_evicts_with_its_own_policy(recipe, family_runs):
    """The checkpoint of a token-budget recipe names, and ships the runtime of, the policy the recipe is named for."""
    case = converted(family_runs, recipe, "llama")
    config = json.loads((case["folder"] / "config.json").read_text())
    shipped = {path.name for path in case["folder"].glob("*_surgery.py")}
    assert config["kv_policy"] == recipe.replace("-", "_")
    assert f"{config['kv_policy']}_surgery.py" in shipped
    assert len(shipped & {f"{name}_surgery.py" for name in RECIPES}) == 1


def test_every_recipe_has_a_case_for_each_check():
    """The lists above come from the registry: a recipe that is registered is in every one of them."""
    assert {recipe for recipe, _ in CASES} == set(RECIPES)
    assert {recipe for recipe, _, _ in INVALID} >= {name for name, cls in RECIPES.items() if fields(cls)}
