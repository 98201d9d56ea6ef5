"""Bad input: one clear line naming the problem and the fix, a non-zero exit, no traceback, nothing written."""

import json
import shutil

import pytest

from helpers import assert_clean_failure, cli
from surgery.base.sizes import parse_size


def run(*args):
    return cli(*args)


def test_missing_path(tmp_path):
    result = run("convert", str(tmp_path / "nope"), "--recipe", "none", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "no such file or folder")
    assert not (tmp_path / "out").exists()


def test_corrupt_safetensors_header(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    result = run("convert", str(broken), "--recipe", "none", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "cannot read safetensors file", "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type(tiny_models, tmp_path):
    other = tmp_path / "gpt"
    shutil.copytree(tiny_models["llama"], other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    result = run("convert", str(other), "--recipe", "none", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "unsupported model_type 'gpt2'")


@pytest.mark.parametrize("count", ["4", "9"])
def test_share_layers_out_of_range(tiny_models, tmp_path, count):
    result = run("convert", str(tiny_models["llama"]), "--recipe", "kvsharer", "--share-layers", count,
                 "--out", str(tmp_path / "out"))
    assert_clean_failure(result, f"--share-layers {count}", "4 layers")


def test_unknown_recipe(tiny_models, tmp_path):
    result = run("convert", str(tiny_models["llama"]), "--recipe", "magic", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "unknown recipe 'magic'", "kvsharer")


def test_option_of_another_recipe(tiny_models, tmp_path):
    result = run("convert", str(tiny_models["llama"]), "--recipe", "none", "--share-layers", "2",
                 "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "--share-layers does not apply")


def test_pickle_refused_without_flag(tmp_path, tiny_models):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_models["llama"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    result = run("inspect", str(pickled))
    assert_clean_failure(result, "pickled", "--allow-pickle")


def test_existing_output(tiny_models, tmp_path):
    (tmp_path / "out").mkdir()
    result = run("convert", str(tiny_models["llama"]), "--recipe", "none", "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "already exists", "--overwrite")


def test_convert_then_inspect(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = run("convert", str(tiny_models["qwen2"]), "--recipe", "none", "--out", str(out), "--no-verify")
    assert result.exit_code == 0, result.output
    result = run("inspect", str(out))
    assert result.exit_code == 0
    assert "qwen2" in result.output and "KV bytes/token (float32)" in result.output
    # the tiny Qwen2's layers 2-3 slide over 6 tokens: 2 growing layers x 2 KV heads x 16 dims x K and V x 4 bytes,
    # and the sliding layers' bound: 2 layers x 256 bytes x 5 tokens
    assert "512 (2 full-attention layers" in result.output and "at most 2,560 bytes" in result.output


def test_recipes_lists_papers():
    result = run("recipes")
    assert result.exit_code == 0 and "arXiv 2410.18517" in result.output


def test_parse_size():
    assert parse_size("1000") == 1000 and parse_size("2G") == 2 * 1024**3 and parse_size("512MB") == 512 * 1024**2


def test_unreachable_hub_model(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run("inspect", "some-org/not-a-cached-model")
    assert_clean_failure(result, "some-org/not-a-cached-model")


def test_ratio_sets_the_number_of_sharing_layers():
    from surgery.recipes.kvsharer import KVSharer

    assert KVSharer(ratio=0.25).target(30) == 8 and KVSharer(share_layers=7).target(30) == 7
    assert KVSharer().target(32) == 8  # the default: a quarter of the layers


@pytest.mark.parametrize("command", [
    ["convert", "demo", "--out", "OUT", "--max-shard-size", "5Q"],
    ["adapt", "CKPT", "--teacher", "demo", "--out", "OUT", "--max-shard-size", "lots"],
    ["eval", "CKPT", "--max-memory", "4 gigs"],
])
def test_a_size_option_that_is_not_a_size_is_one_line(command, tmp_path):
    """The shared size options fail at parse time, naming the option, before anything is read or written."""
    args = [str(tmp_path / arg) if arg in ("OUT", "CKPT") else arg for arg in command]
    flag = next(arg for arg in command if arg.startswith("--max"))
    assert_clean_failure(cli(*args), flag, "cannot read size", code=2)
    assert not (tmp_path / "OUT").exists()
