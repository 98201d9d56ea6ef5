"""Bad input ends in one `error:` line that names the problem and the fix, a non-zero exit, and no traceback.

Each case here was found by trying the CLI as a new user or an attacker would. They run in-process through click's
CliRunner on tiny random models.
"""

import errno
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, cli, run_convert
from safetensors.torch import load_file, save_file


@pytest.fixture
def source(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], folder)
    return folder


@pytest.fixture
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def untokenized_checkpoint(tiny_models, tmp_path_factory) -> Path:
    return run_convert(tiny_models["llama"], tmp_path_factory.mktemp("bad") / "notok")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def convert(source, tmp_path, *options, recipe="none"):
    return cli("convert", source, "--recipe", recipe, "--out", tmp_path / "out", "--no-verify", *options)


# --- the source --------------------------------------------------------------------------------------------------

def _shape_change(tensors):
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)


def _nan(tensors):
    tensors["model.layers.2.self_attn.o_proj.weight"][0, 0] = float("nan")


SOURCE_CASES = {
    "index not json": (lambda f: (f / "model.safetensors.index.json").write_text("{not json"), "not a valid index"),
    "index without weight_map": (lambda f: (f / "model.safetensors.index.json").write_text('{"metadata": {}}'), "no weight_map"),
    "index names a missing shard": (lambda f: (f / "model.safetensors.index.json").write_text(
        '{"weight_map": {"lm_head.weight": "gone.safetensors"}}'), "missing shard"),
    "config is a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "zero heads": (lambda f: edit_json(f / "config.json", lambda c: c.update(num_attention_heads=0)),
                   "num_attention_heads must be a positive integer"),
    "hidden size string": (lambda f: edit_json(f / "config.json", lambda c: c.update(hidden_size="64")),
                           "hidden_size must be a positive integer"),
    "kv heads do not divide": (lambda f: edit_json(f / "config.json", lambda c: c.update(num_key_value_heads=3)),
                               "not a multiple of num_key_value_heads"),
    "no model_type": (lambda f: edit_json(f / "config.json", lambda c: c.pop("model_type")), "unsupported model_type None"),
}


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_bad_source(source, tmp_path, case):
    damage, needle = SOURCE_CASES[case]
    damage(source)
    assert_clean_failure(convert(source, tmp_path), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["none", "kvsharer"])
def test_tensor_of_the_wrong_shape(source, tmp_path, recipe):
    edit_weights(source, _shape_change)
    assert_clean_failure(convert(source, tmp_path, recipe=recipe), "model.layers.1.mlp.up_proj.weight has shape (95, 64)")


def every_recipe() -> list[str]:
    from surgery.recipes import RECIPES

    return sorted(RECIPES)


@pytest.mark.parametrize("recipe,value", [(recipe, "nan") for recipe in every_recipe()]
                         + [("none", "inf"), ("kvsharer", "-inf")])
def test_non_finite_weights_are_named_before_any_recipe_reads_them(tiny_models, tmp_path, recipe, value):
    """Checked once, streaming, before calibration: KVSharer used to say no layer pair passed --threshold 0."""
    source = tmp_path / "src"
    shutil.copytree(tiny_models["mixtral" if recipe == "adamoe" else "llama"], source)
    edit_weights(source, lambda tensors: tensors["model.layers.1.self_attn.o_proj.weight"].__setitem__(
        (0, 0), float(value)))
    options = ["--share-layers", "1", "--threshold", "0"] if recipe == "kvsharer" else []
    result = convert(source, tmp_path, *options, recipe=recipe)
    assert_clean_failure(result, "model.layers.1.self_attn.o_proj.weight holds NaN or infinite values")
    assert not (tmp_path / "out").exists()


def test_non_finite_weights_keep_an_existing_output(source, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    edit_weights(source, _nan)
    assert_clean_failure(convert(source, tmp_path, "--overwrite", recipe="kvsharer"), "NaN")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("content", ["truncated", "random", "empty"])
def test_bad_gguf(tmp_path, cache, content):
    from surgery.checkpoint.sources import demo_gguf_path

    data = {"truncated": demo_gguf_path().read_bytes()[:4096], "random": bytes(range(256)) * 64, "empty": b""}[content]
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(data)
    assert_clean_failure(cli("inspect", gguf), "x.gguf")
    assert not any(p.name.count(".tmp-") for p in cache.rglob("*"))


# --- options -----------------------------------------------------------------------------------------------------

OPTION_CASES = {
    "calibration batch size 0": (["--recipe", "kvsharer", "--calib-batch-size", "0"], "--calib-batch-size"),
    "old batch size option": (["--recipe", "kvsharer", "--batch-size", "2"], "--batch-size"),
    "keep at least -1": (["--recipe", "snapkv", "--keep-at-least", "-1"], "--keep-at-least"),
    "keep and keep tokens": (["--recipe", "snapkv", "--keep", "0.3", "--keep-tokens", "9"], "--keep and --keep-tokens"),
    "kv fraction for snapkv": (["--recipe", "snapkv", "--kv-fraction", "0.5"], "--kv-fraction does not apply"),
    "unknown calibration corpus file": (["--recipe", "kvsharer", "--calib", "./missing.txt"], "no such calibration file"),
    "search samples 0": (["--recipe", "matryoshka", "--search-samples", "0"], "--search-samples"),
    "num samples 0": (["--recipe", "kvsharer", "--num-samples", "0"], "--num-samples"),
    "seq len 0": (["--recipe", "kvsharer", "--seq-len", "0"], "--seq-len"),
    "window -5": (["--recipe", "snapkv", "--window", "-5"], "--window"),
    "share layers 0": (["--recipe", "kvsharer", "--share-layers", "0"], "--share-layers"),
    "keep 0": (["--recipe", "snapkv", "--keep", "0"], "--keep"),
    "ratio 1": (["--recipe", "kvsharer", "--ratio", "1"], "--ratio"),
    "two eviction policies": (["--recipe", "snapkv,zigzag"], "both token-eviction policies"),
    "shard size 0": (["--max-shard-size", "0"], "--max-shard-size"),
    "adapt steps 0": (["--adapt-steps", "0"], "--adapt-steps"),
    "bad push repo": (["--push-to-hub", "not a repo"], "not a valid Hub repo id"),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_bad_convert_option(source, tmp_path, case):
    options, needle = OPTION_CASES[case]
    result = cli("convert", source, "--out", tmp_path / "out", "--no-verify", *options)
    assert_clean_failure(result, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,needle", [
    (["--alpha", "5"], "--alpha"), (["--grad-accum", "0"], "--grad-accum"), (["--steps", "0"], "--steps"),
    (["--steps", "-1"], "--steps"), (["--lr", "-1"], "--lr"), (["--seq-len", "1"], "--seq-len"),
])
def test_bad_adapt_option(checkpoint, tiny_with_tokenizer, tmp_path, options, needle):
    result = cli("adapt", checkpoint, "--teacher", tiny_with_tokenizer, "--out", tmp_path / "out", *options)
    assert_clean_failure(result, needle)


def test_adapt_settings_check_ranges_from_python_too():
    from surgery.adapt.engine import AdaptSettings
    from surgery.base.errors import SurgeryError

    with pytest.raises(SurgeryError, match="--grad-accum must be >= 1, got 0"):
        AdaptSettings(teacher="demo", grad_accum=0)


@pytest.mark.parametrize("options,needle", [
    (["--task", "passkey", "--lengths", "abc"], "--lengths"),
    (["--task", "passkey", "--lengths", ""], "--lengths"),
    (["--task", "passkey", "--lengths", "-5"], "--lengths"),
    (["--context", "0"], "--context"),
    (["--task", "passkey", "--per-depth", "0"], "--per-depth"),
    (["--json", "/nonexistent-folder/results.json"], "does not exist"),
    (["--segments", "0"], "--segments"), (["--score-tokens", "0"], "--score-tokens"),
    (["--prompt-len", "1"], "--prompt-len"), (["--keep", "0"], "--keep"),
    (["--prompt-len", "900000"], "fewer than one segment"),
])
def test_bad_eval_option(checkpoint, options, needle):
    assert_clean_failure(cli("eval", checkpoint, *options), needle)


@pytest.mark.parametrize("options,needle", [
    (["--prompt", "  "], "--prompt is empty"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"), (["--baseline", "/no/such/model"], "/no/such/model"),
])
def test_bad_generate_option(checkpoint, options, needle):
    assert_clean_failure(cli("generate", checkpoint, *options), needle)


def test_generate_without_tokenizer(untokenized_checkpoint):
    assert_clean_failure(cli("generate", untokenized_checkpoint), "no tokenizer")


def test_baseline_with_another_vocabulary_fails_before_evaluating(checkpoint, tiny_models):
    assert_clean_failure(cli("eval", checkpoint, "--baseline", tiny_models["llama"]), "vocabulary of 128", "49152")


def test_teacher_with_another_vocabulary(checkpoint, tiny_models, tmp_path):
    result = cli("adapt", checkpoint, "--teacher", tiny_models["llama"], "--out", tmp_path / "out", "--steps", "1")
    assert_clean_failure(result, "teacher", "vocabulary")


def test_push_dry_run_checks_the_repo_id(checkpoint):
    assert_clean_failure(cli("push", checkpoint, "not/a/valid id", "--dry-run"), "not a valid Hub repo id")


# --- calibration data --------------------------------------------------------------------------------------------

def test_binary_jsonl(tiny_with_tokenizer, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_bytes(bytes(range(128, 256)) * 8)
    result = convert(tiny_with_tokenizer, tmp_path, "--calib", data, "--share-layers", "1", recipe="kvsharer")
    assert_clean_failure(result, "calib.jsonl is not UTF-8")


@pytest.mark.parametrize("calib,module", [("x.parquet", "pyarrow"), ("wikitext2", "datasets")])
def test_missing_data_extra_is_named(tiny_with_tokenizer, tmp_path, monkeypatch, calib, module):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module, module + ".parquet"]:
        monkeypatch.setitem(sys.modules, name, None)
    if calib.endswith(".parquet"):
        (tmp_path / calib).write_bytes(b"PAR1")
        calib = str(tmp_path / calib)
    result = convert(tiny_with_tokenizer, tmp_path, "--calib", calib, "--share-layers", "1", recipe="kvsharer")
    assert_clean_failure(result, module, "surgery[data]")


# --- the environment ---------------------------------------------------------------------------------------------

def test_out_under_a_file(source, tmp_path):
    (tmp_path / "file").write_text("x")
    result = cli("convert", source, "--recipe", "none", "--out", tmp_path / "file" / "out", "--no-verify")
    assert_clean_failure(result, "which is a file")


def test_out_on_a_read_only_file_system(source):
    result = cli("convert", source, "--recipe", "none", "--out", "/sys/surgery-out", "--no-verify")
    assert_clean_failure(result, "not writable")


def test_surgery_cache_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cachefile"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert_clean_failure(cli("inspect", tmp_path / "m.gguf"), "is a file", "SURGERY_CACHE")


DISK_FULL = {  # what a full disk looks like from the writers: the OS's errno, and safetensors' short write
    "ENOSPC": lambda *args: OSError(errno.ENOSPC, "No space left on device", str(args[1])),
    "short write": lambda *args: OSError("3538944 requested and 3078912 written"),
}


@pytest.mark.parametrize("how", DISK_FULL)
def test_disk_full_names_the_disk_and_the_bytes_and_leaves_nothing(source, tmp_path, monkeypatch, how):
    import surgery.checkpoint.tensor_io

    def full(*args, **kwargs):
        raise DISK_FULL[how](*args)

    monkeypatch.setattr(surgery.checkpoint.tensor_io.shutil, "copyfileobj", full)
    result = convert(source, tmp_path)
    assert_clean_failure(result, f"the disk holding {tmp_path} is full", "free", "needed", "nothing was kept")
    assert "requested and" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_full_cache_disk_does_not_blame_the_gguf(tmp_path, cache, monkeypatch):
    """Unpacking a GGUF into a full SURGERY_CACHE: the disk is named, and the intact file is not to be re-downloaded."""
    import surgery.checkpoint.sources

    def full(gguf, folder):
        raise OSError(errno.ENOSPC, "Not enough free space to write the shard")

    monkeypatch.setattr(surgery.checkpoint.sources, "stream_gguf", full)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    result = cli("inspect", tmp_path / "m.gguf")
    assert_clean_failure(result, f"the disk holding {cache / 'gguf'} is full", "the source is intact", "SURGERY_CACHE")
    assert "re-download" not in result.stderr
    assert not any(path.name.startswith(".") or ".tmp-" in path.name for path in (cache / "gguf").iterdir())


@pytest.mark.parametrize("command", ["generate", "eval", "inspect"])
def test_truncated_checkpoint(checkpoint, tmp_path, command):
    folder = tmp_path / "cut"
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_clean_failure(cli(command, folder), "model.safetensors")


@pytest.mark.parametrize("command", ["generate", "eval", "inspect"])
def test_bad_kv_source(checkpoint, tmp_path, command):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoint, folder)
    edit_json(folder / "config.json", lambda c: c.update(kv_source=[0, 0, 3, 0]))
    # the reason itself, not the validator's heading that precedes it
    assert_clean_failure(cli(command, folder), "not a valid surgery config: layer 2 cannot read the cache of layer 3",
                         "re-export")


def test_push_without_token_says_so(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert_clean_failure(cli("push", checkpoint, "me/model", "--no-verify"), "no Hub token", "hf auth login")


def test_unexpected_errors_are_one_line_with_a_hint(source, tmp_path, monkeypatch):
    import surgery.pipelines.convert

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected\nwith a second line")

    monkeypatch.setattr(surgery.pipelines.convert, "plan_recipes", broken)
    line = assert_clean_failure(convert(source, tmp_path), "RuntimeError", "something nobody expected", "-v")
    assert "second line" not in line
    verbose = cli("-v", "convert", source, "--recipe", "none", "--out", tmp_path / "out", "--no-verify")
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr


# --- --allow-pickle reaches every load ---------------------------------------------------------------------------

@pytest.fixture
def pickled(tiny_with_tokenizer, tmp_path, cache) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for path in tiny_with_tokenizer.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder)
    torch.save(load_file(tiny_with_tokenizer / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


@pytest.mark.slow
def test_allow_pickle_is_accepted_by_every_command_that_loads_a_model(pickled, checkpoint, tmp_path):
    assert_clean_failure(cli("inspect", pickled), "pickled", "--allow-pickle")
    assert cli("inspect", pickled, "--allow-pickle").exit_code == 0
    result = cli("eval", checkpoint, "--baseline", pickled, "--allow-pickle", "--segments", "1", "--prompt-len", "300", "--score-tokens", "20", "--context", "64",
                 "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.stderr
    result = cli("adapt", checkpoint, "--teacher", pickled, "--allow-pickle", "--out", tmp_path / "adapted",
                 "--steps", "1", "--batch-size", "1", "--seq-len", "8", "--num-samples", "2", "--no-verify")
    assert result.exit_code == 0, result.stderr
    result = cli("convert", pickled, "--allow-pickle", "--recipe", "kvsharer", "--share-layers", "1",
                 "--num-samples", "2", "--seq-len", "16", "--adapt-steps", "1", "--out", tmp_path / "both",
                 "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "both" / "model.safetensors").is_file()


def test_calibration_runs_with_little_memory_left(tiny_with_tokenizer, tmp_path, monkeypatch):
    """Self-generated text is sampled over the mapped shards and real text runs layer by layer: neither needs the
    whole model in memory, so neither is refused when little is left (the quality check is skipped then)."""
    import surgery.pipelines.convert

    monkeypatch.setattr(surgery.pipelines.convert, "available_memory", lambda: 10 * 2**20)  # 10 MiB left
    result = convert(tiny_with_tokenizer, tmp_path, "--share-layers", "1", "--threshold", "-1", "--calib",
                     "self-generated", recipe="kvsharer")
    assert result.exit_code == 0, result.stderr
    shutil.rmtree(tmp_path / "out")
    calib = tmp_path / "calib.txt"
    calib.write_text("Rivers of Europe include the Danube, the Rhine and the Elbe. " * 200)
    result = convert(tiny_with_tokenizer, tmp_path, "--share-layers", "1", "--threshold", "-1", "--calib", calib,
                     recipe="kvsharer")
    assert result.exit_code == 0, result.stderr  # layer by layer, with real text: no whole model needed


def test_cuda_device_without_a_gpu_is_one_line(source, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli("convert", source, "--recipe", "kvsharer", "--device", "cuda", "--out", tmp_path / "out")
    assert_clean_failure(result, "--device cuda", "no CUDA device", "--device cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["eval", "{ckpt}", "--max-memory", "lots"], "cannot read size 'lots'"),
    (["adapt", "{ckpt}", "--teacher", "{ckpt}", "--out", "{out}", "--lora-rank", "-1"], "--lora-rank"),
    (["convert", "{ckpt}", "--recipe", "matryoshka", "--search", "greedy", "--out", "{out}"], "--search"),
    (["convert", "{ckpt}", "--compute-dtype", "int8", "--out", "{out}"], "--compute-dtype"),
])
def test_memory_and_search_options_reject_bad_values(tiny_checkpoint, tmp_path, args, needle):
    """The options this issue added: one line naming the option, nothing written."""
    args = [a.format(ckpt=tiny_checkpoint, out=tmp_path / "out") for a in args]
    assert_clean_failure(cli(*args), needle)
    assert not (tmp_path / "out").exists()
