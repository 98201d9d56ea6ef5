"""The first ten minutes: a fast CLI, options per recipe, replayable conversions, offline corpora, honest eval
and clean checkpoint files."""

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from helpers import assert_clean_failure, cli, run_convert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import assert_clean_outcome

from surgery.recipes import RECIPES

LIGHT_COMMANDS = [["--help"], ["--version"], ["recipes"], ["convert", "--help"], ["eval", "--help"],
                  ["adapt", "--help"], ["push", "--help"], ["generate", "--help"], ["inspect", "--help"]]


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=" ".join)
def test_light_commands_import_neither_torch_nor_transformers(args):
    """Help, version and the recipe list run without importing torch or transformers (startup time: bench)."""
    code = ("import sys\nfrom surgery.cli.main import main\n"
            f"try:\n    main({args!r}, prog_name='surgery')\nexcept SystemExit:\n    pass\n"
            "loaded = [name for name in ('torch', 'transformers') if name in sys.modules\n"
            "          and type(sys.modules[name]).__name__ != '_LazyModule']\n"
            "print('LOADED', loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


def test_convert_help_lists_recipes_and_groups_their_options():
    text = cli("convert", "--help").output
    assert "--recipe [" + "|".join(RECIPES) + "][,...]" in " ".join(text.split())
    headings = [line for line in text.splitlines() if line.endswith("options:")]
    assert headings[:2] == ["Calibration options:", "lesa, depth-up options:"]
    position = {heading: text.index(heading) for heading in headings}
    for flag, heading in [("--target-layers", "lesa, depth-up options:"), ("--norms", "lesa options:"),
                          ("--share-layers", "kvsharer options:"), ("--kv-fraction", "matryoshka options:"),
                          ("--keep ", "snapkv, pyramid, zigzag, dynamickv, streamingllm, h2o options:"), ("--calibrated", "zigzag options:"),
                          ("--calib-batch-size", "Calibration options:")]:
        following = [h for h in headings if position[h] > position[heading]]
        end = position[following[0]] if following else len(text)
        assert position[heading] < text.index(flag) < end, (flag, heading)


def test_no_option_name_means_two_things():
    """An option that several recipes take is one field declaration, with one help text and one range."""
    seen = {}
    for recipe in RECIPES.values():
        for spec in fields(recipe):
            if spec.name in seen:
                assert spec.metadata == seen[spec.name].metadata and spec.default == seen[spec.name].default, spec.name
            seen[spec.name] = spec


def test_old_option_names_in_a_recipe_yaml_still_read():
    from surgery.recipes import recipes_from_record

    snap, mkv = recipes_from_record({"recipes": [{"name": "snapkv", "options": {"budget": 0.3, "budget_tokens": None}},
                                                 {"name": "matryoshka", "options": {"budget": 0.25, "batch_size": 8}}]})
    assert snap.keep == 0.3 and mkv.kv_fraction == 0.25


def safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors"))}


def test_recipe_file_replays_byte_identical(tiny_with_tokenizer, tmp_path):
    first = tmp_path / "first"
    result = cli("convert", tiny_with_tokenizer, "--recipe", "kvsharer", "--share-layers", "2", "--threshold", "-1",
                 "--order", "similar", "--num-samples", "3", "--seq-len", "24", "--seed", "5", "--dtype", "bfloat16",
                 "--no-verify", "--out", first)
    assert result.exit_code == 0, result.stderr
    record = yaml.safe_load((first / "recipe.yaml").read_text())
    assert record["calibration"]["source"] == "stdlib-docstrings"  # real prose by default
    replay = tmp_path / "replay"
    result = cli("convert", "--recipe-file", first / "recipe.yaml", tiny_with_tokenizer, "--no-verify", "--out", replay)
    assert result.exit_code == 0, result.stderr
    assert safetensors_bytes(replay) == safetensors_bytes(first) != {}
    other = tmp_path / "other-seed"
    assert cli("convert", tiny_with_tokenizer, "--recipe", "kvsharer", "--share-layers", "2", "--threshold", "-1",
               "--num-samples", "3", "--seq-len", "24", "--seed", "6", "--no-verify", "--out", other).exit_code == 0
    assert yaml.safe_load((other / "recipe.yaml").read_text())["recipes"][0]["plan"] != record["recipes"][0]["plan"] or \
        safetensors_bytes(other) != safetensors_bytes(first)


def test_recipe_file_refuses_settings_it_would_replace(tiny_checkpoint, tmp_path):
    result = cli("convert", "--recipe-file", tiny_checkpoint / "recipe.yaml", "--share-layers", "2", "--out", tmp_path / "o")
    assert_clean_failure(result, "--share-layers", "--recipe-file")
    assert_clean_failure(cli("convert", "--recipe-file", tmp_path / "missing.yaml", "--out", tmp_path / "o"),
                         "no such recipe file")
    assert_clean_failure(cli("convert", "--out", tmp_path / "o"), "no MODEL given")
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("recipes: [unclosed\n")
    assert_clean_failure(cli("convert", "--recipe-file", garbage, "--out", tmp_path / "o"), "not valid YAML")
    assert not (tmp_path / "o").exists()


yaml_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True), st.text(max_size=6),
                        st.lists(st.integers(0, 3), max_size=2), st.just({}), st.just({"name": "kvsharer"}))
RECORD_PATHS = [("recipes",), ("recipes", 0), ("recipes", 0, "name"), ("recipes", 0, "options"),
                ("recipes", 0, "options", "share_layers"), ("recipes", 0, "options", "threshold"),
                ("recipes", 0, "options", "order"), ("recipes", 0, "options", "extra"), ("calibration",),
                ("calibration", "source"), ("calibration", "num_samples"), ("calibration", "seq_len"),
                ("calibration", "seed"), ("calibration", "batch_size"), ("calibration", "compute_dtype"),
                ("calibration", "device"), ("export", "dtype"), ("export", "max_shard_size"), ("source", "model")]


def mutate(record, path, value):
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


@pytest.mark.slow
@settings(max_examples=25, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.sampled_from(RECORD_PATHS), yaml_values), min_size=1, max_size=2))
def test_fuzzed_recipe_file_gives_a_conversion_or_one_line(tiny_checkpoint, tiny_with_tokenizer, tmp_path_factory,
                                                           changes):
    root = tmp_path_factory.mktemp("replay")
    record = yaml.safe_load((tiny_checkpoint / "recipe.yaml").read_text())
    record["calibration"].update(num_samples=2, seq_len=16)
    for path, value in changes:
        try:
            mutate(record, path, value)
        except (KeyError, IndexError, TypeError):
            pass
    (root / "recipe.yaml").write_text(yaml.safe_dump(record))
    result = cli("convert", "--recipe-file", root / "recipe.yaml", tiny_with_tokenizer, "--no-verify", "--out", root / "out")
    assert_clean_outcome(result)
    assert result.exit_code == 0 or not (root / "out").exists()


def test_the_three_offline_corpora_share_no_eight_word_run():
    from surgery.calibrate.corpora import CALIBRATION, HAYSTACK, HELDOUT, corpus_text, paragraphs, shingles

    runs = {}
    for name in (CALIBRATION, HELDOUT, HAYSTACK):
        text = corpus_text(name)
        assert len(text) > 300_000, name  # enough for calibration windows and 8k-token haystacks
        runs[name] = set().union(*(shingles(paragraph) for paragraph in paragraphs(text)))
    assert not runs[CALIBRATION] & runs[HELDOUT]
    assert not runs[CALIBRATION] & runs[HAYSTACK]
    assert not runs[HELDOUT] & runs[HAYSTACK]
    assert ">>>" not in corpus_text(CALIBRATION)


def test_far_from_source_names_the_milder_setting():
    from surgery.evals.evaluate import far_from_source
    from surgery.recipes import KVSharer, SnapKV

    close = {"model": {"perplexity": 13.0, "greedy_agreement": 0.8}, "baseline": {"perplexity": 12.0}}
    assert far_from_source(close, [SnapKV()]) is None
    far = {"model": {"perplexity": 30.0, "greedy_agreement": 0.3}, "baseline": {"perplexity": 12.0}}
    line = far_from_source(far, [KVSharer()])
    assert "greedy agreement 30%" in line and "perplexity 30.0 against 12.0" in line and "--order similar" in line
    assert far_from_source({"model": {"perplexity": 99.0}}, [SnapKV()]) is None  # nothing to compare with


def test_compressed_quality_reads_the_continuation_through_the_evicted_cache(tiny_with_tokenizer, tmp_path):
    """Perplexity after a compressed prompt equals a token-by-token decode from the compressed prefill (an
    independent path), and differs from the full cache's: the eviction is really applied."""
    import math

    import torch
    from helpers import decode_stepwise, load_remote

    from surgery.evals.evaluate import EvalSettings, compressed_quality

    out = run_convert(tiny_with_tokenizer, tmp_path / "snap", recipe="snapkv", recipe_options={"keep": 0.25, "keep_at_least": 0})
    model = load_remote(out)
    torch.manual_seed(0)
    segment = torch.randint(3, 49152, (1, 72))
    settings = EvalSettings(prompt_len=60, score_tokens=12)
    logits, _ = decode_stepwise(model, segment, 60)
    reference = math.exp(torch.nn.functional.cross_entropy(logits[0, 59:-1].double(), segment[0, 60:]).item())
    measured = compressed_quality(model, [segment], settings)
    assert measured["perplexity"] == pytest.approx(reference, rel=1e-4)
    full = compressed_quality(model, [segment], EvalSettings(prompt_len=60, score_tokens=12, keep=1.0))
    assert full["perplexity"] != pytest.approx(measured["perplexity"], rel=1e-4)
    assert measured["kv_bytes_per_token"] < 0.5 * full["kv_bytes_per_token"]


def test_a_bad_baseline_fails_before_any_model_loads(tiny_checkpoint, monkeypatch):
    import surgery.evals.evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(surgery.evals.evaluate, "load_source_model", refuse)
    assert_clean_failure(cli("eval", tiny_checkpoint, "--baseline", "/no/such/model"), "/no/such/model")


@pytest.mark.slow
def test_passkey_writes_eval_results_by_default_and_keeps_quality(tiny_with_tokenizer, tmp_path):
    out = run_convert(tiny_with_tokenizer, tmp_path / "snap", recipe="snapkv", recipe_options={"keep": 0.3})
    quality = cli("eval", out, "--baseline", tiny_with_tokenizer, "--segments", "1", "--prompt-len", "200",
                  "--score-tokens", "20", "--context", "64")
    assert quality.exit_code == 0, quality.stderr
    assert "setting: snapkv (snapkv keeps 30% of each prompt)" in quality.output
    passkey = cli("eval", out, "--task", "passkey", "--lengths", "160", "--per-depth", "1", "--baseline",
                  tiny_with_tokenizer)
    assert passkey.exit_code == 0, passkey.stderr
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"quality", "passkey"}
    assert set(results["passkey"]["results"]) == {"query-aware", "context-only", "full cache", "baseline"}
    assert results["quality"]["model"]["kv_bytes_per_token"] < results["quality"]["baseline"]["kv_bytes_per_token"]
    full = results["quality"]["full_cache"]  # the same model with nothing evicted, on the same prompts
    assert full["kv_bytes_per_token"] == results["quality"]["baseline"]["kv_bytes_per_token"]
    card = (out / "README.md").read_text()
    assert "Pass-key retrieval" in card and "| full cache |" in card


def test_tokenizer_files_are_clean_and_load_without_remote_code(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only", "auto_map", "name_or_path"} & set(config)
    assert config["model_max_length"] == 128  # the tiny model's max_position_embeddings, not 1e30
    code = ("import sys\nfrom transformers import AutoTokenizer\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(tiny_checkpoint)!r}, trust_remote_code=False)\n"
            "print('IDS', tokenizer('hello world')['input_ids'])\n"
            "print('REMOTE', [m for m in sys.modules if m.startswith('transformers_modules')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, stdin=subprocess.PIPE)
    assert "IDS [" in out.stdout and "REMOTE []" in out.stdout, out.stdout + out.stderr
    assert "Do you wish to run the custom code" not in out.stdout + out.stderr


def test_card_states_gguf_provenance_and_no_relation_without_training(tmp_path):
    from surgery.checkpoint.card import render_card
    from surgery.checkpoint.records import write_recipe

    record = {"command": "surgery convert demo --recipe snapkv", "source": {
        "model": "demo", "name": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
        "gguf": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "quantization": "Q4_1"}},
        "recipes": [{"name": "snapkv", "options": {"keep": 0.3}, "plan": {"policy": "snapkv", "budget": 0.3}}],
        "export": {"dtype": "float32"}}
    write_recipe(tmp_path, record)
    card = render_card(tmp_path)
    assert "base_model_relation" not in card
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 quantization), dequantized to\nfloat32" in card
    assert "--baseline demo" in card and "trust_remote_code=False" in card
    write_recipe(tmp_path, {**record, "adapt": {"steps": 1, "batch_size": 1, "seq_len": 8, "grad_accum": 1,
                                                "processes": 1, "tokens": 8, "wall_s": 1, "alpha": 1.0, "lr": 0.1,
                                                "warmup_steps": 0, "mixed_precision": "no", "final_loss": 1.0}})
    assert "base_model_relation: finetune" in render_card(tmp_path)


def test_generate_answers_with_the_checkpoint_and_its_baseline(tiny_with_tokenizer, tmp_path):
    """Side by side: an identity conversion answers exactly as its source does."""
    out = run_convert(tiny_with_tokenizer, tmp_path / "same", recipe="none")
    result = cli("generate", out, "--baseline", tiny_with_tokenizer, "--prompt", "Name three rivers.",
                 "--max-new-tokens", "6")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(out), str(tiny_with_tokenizer)]
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1] != ""


def test_a_short_prompt_stays_whole_under_the_default_floor(tiny_with_tokenizer, tmp_path):
    """--keep-at-least (128 by default): a 100-token prompt is not compressed; a 400-token one keeps 30% of its
    tokens, but at least 128, per layer on average, counted in the cache's tensors."""
    import torch
    from helpers import load_remote

    out = run_convert(tiny_with_tokenizer, tmp_path / "snap", recipe="snapkv", recipe_options={"keep": 0.1})
    model = load_remote(out)
    assert model.config.kv_min_tokens == 128

    def kept(length: int) -> float:
        ids = torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        counts = [layer.keys.shape[-2] if layer.valid is None else int(layer.valid[0].sum()) / layer.valid.shape[1]
                  for layer in cache.layers if layer.keys is not None]
        return sum(counts) / len(counts)

    assert kept(100) == 100
    assert kept(400) == pytest.approx(128, abs=0.5)
