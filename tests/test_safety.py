"""Safety: no command deletes or changes its inputs, runs code surgery did not write, or leaves half-written output.

Data-loss cases compare hashes of every file before and after; foreign-code cases plant Python files that would
write a marker file if anything imported them.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_clean_failure, cli, run_convert
from transformers import AutoModelForCausalLM

from surgery.base.outputs import exclusive, remove_strays


def tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def source(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "models" / "src"
    shutil.copytree(tiny_models["llama"], folder)
    return folder


@pytest.fixture
def kvsharer_checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


# --- --out never overlaps an input -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_convert_refuses_an_out_that_overlaps_the_source(source, where):
    out = {"same": source, "parent": source.parent, "inside": source / "converted"}[where]
    before, around = tree_hash(source), tree_hash(source.parent)
    result = cli("convert", source, "--recipe", "none", "--out", out, "--overwrite", "--no-verify")
    assert_clean_failure(result, "overlaps the input")
    assert tree_hash(source) == before and tree_hash(source.parent) == around


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_convert_refuses_the_current_folder(source, tmp_path, monkeypatch, out):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    before = tree_hash(tmp_path / "work")
    result = cli("convert", source, "--recipe", "none", "--out", out, "--overwrite", "--no-verify")
    assert_clean_failure(result, "current folder")
    assert tree_hash(tmp_path / "work") == before


def test_adapt_refuses_to_write_over_its_input(kvsharer_checkpoint, tiny_with_tokenizer):
    before = tree_hash(kvsharer_checkpoint)
    result = cli("adapt", kvsharer_checkpoint, "--teacher", tiny_with_tokenizer, "--out", kvsharer_checkpoint,
                 "--overwrite", "--steps", "1", "--no-verify")
    assert_clean_failure(result, "overlaps the input")
    assert tree_hash(kvsharer_checkpoint) == before


def test_adapt_refuses_to_write_over_its_teacher(kvsharer_checkpoint, tiny_with_tokenizer):
    before = tree_hash(tiny_with_tokenizer)
    result = cli("adapt", kvsharer_checkpoint, "--teacher", tiny_with_tokenizer, "--out", tiny_with_tokenizer.parent,
                 "--overwrite", "--steps", "1", "--no-verify")
    assert_clean_failure(result, "overlaps the input")
    assert tree_hash(tiny_with_tokenizer) == before


def test_resume_never_implies_overwrite(kvsharer_checkpoint, tiny_with_tokenizer, tmp_path):
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("years of work")
    before = tree_hash(unrelated)
    result = cli("adapt", kvsharer_checkpoint, "--teacher", tiny_with_tokenizer, "--out", unrelated, "--resume",
                 "--steps", "1", "--no-verify")
    assert_clean_failure(result, "already exists", "--overwrite")
    assert tree_hash(unrelated) == before


def test_resume_without_saved_state_stops(kvsharer_checkpoint, tiny_with_tokenizer, tmp_path):
    result = cli("adapt", kvsharer_checkpoint, "--teacher", tiny_with_tokenizer, "--out", tmp_path / "new",
                 "--resume", "--steps", "1", "--no-verify")
    assert_clean_failure(result, "no saved training state", "without --resume")
    assert not (tmp_path / "new").exists()


# --- foreign code is never run ----------------------------------------------------------------------------------

def plant(folder: Path, module: str, marker: Path) -> None:
    """A Python file that, if anything imported it, would write `marker`."""
    (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('foreign code ran')\n")


@pytest.fixture
def remote_code_source(tiny_with_tokenizer, tmp_path) -> tuple[Path, Path]:
    """A llama folder whose config.json and tokenizer_config.json both point at planted remote code."""
    folder = tmp_path / "remote"
    shutil.copytree(tiny_with_tokenizer, folder)
    marker = tmp_path / "FOREIGN_CODE_RAN"
    plant(folder, "evil_model", marker)
    plant(folder, "evil_tokenizer", marker)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_model.Config", "AutoModelForCausalLM": "evil_model.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.Tok", "evil_tokenizer.Tok"]}
    tokenizer_config["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder, marker


@pytest.mark.slow
def test_source_auto_map_is_never_carried_nor_run(remote_code_source, tmp_path):
    folder, marker = remote_code_source
    out = tmp_path / "out"
    result = cli("convert", folder, "--recipe", "kvsharer", "--share-layers", "1", "--threshold", "-1",
                 "--num-samples", "2", "--seq-len", "16", "--out", out, "--eval")
    assert result.exit_code == 0, result.stderr
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer_config and tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith("modeling_surgery.")
    assert not list(out.glob("evil_*"))
    result = cli("generate", out, "--prompt", "hello", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.stderr
    assert not marker.exists()


def test_remote_only_tokenizer_is_refused_without_the_flag(remote_code_source, tmp_path):
    folder, marker = remote_code_source
    (folder / "tokenizer.json").unlink()
    result = cli("convert", folder, "--recipe", "none", "--out", tmp_path / "out", "--no-verify")
    assert_clean_failure(result, "remote code", "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["generate", "eval", "inspect", "teacher"])
def test_checkpoint_python_files_are_never_run(kvsharer_checkpoint, tiny_with_tokenizer, tmp_path, command):
    folder = tmp_path / "claimed"
    shutil.copytree(kvsharer_checkpoint, folder)
    marker = tmp_path / "FOREIGN_CODE_RAN"
    for name in ("modeling_surgery", "configuration_surgery", "cache_surgery"):
        plant(folder, name, marker)
    args = {
        "generate": ["generate", folder, "--max-new-tokens", "2"],
        "eval": ["eval", folder, "--segments", "1", "--prompt-len", "300", "--score-tokens", "20", "--context", "64", "--json", tmp_path / "r.json"],
        "inspect": ["inspect", folder],
        "teacher": ["adapt", kvsharer_checkpoint, "--teacher", folder, "--out", tmp_path / "a", "--steps", "1",
                    "--batch-size", "1", "--seq-len", "8", "--num-samples", "2", "--no-verify"],
    }[command]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert not marker.exists()


def test_push_does_not_run_a_folders_edited_code(kvsharer_checkpoint, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(kvsharer_checkpoint, folder)
    marker = tmp_path / "FOREIGN_CODE_RAN"
    plant(folder, "modeling_surgery", marker)
    result = cli("push", folder, "me/model", "--dry-run")
    assert_clean_failure(result, "modeling_surgery.py", "--trust-remote-code")
    assert not marker.exists()


def test_newer_checkpoint_format_is_refused(kvsharer_checkpoint, tmp_path):
    folder = tmp_path / "future"
    shutil.copytree(kvsharer_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["surgery_format"] == 3
    config["surgery_format"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    for args in (["generate", folder], ["inspect", folder], ["eval", folder]):
        assert_clean_failure(cli(*args), "format 99", "up to 3", "upgrade")


def test_sharing_layer_turned_owner_is_an_error_not_random_weights(kvsharer_checkpoint, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(kvsharer_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    sharer = next(i for i, s in enumerate(config["kv_source"]) if s != i)
    config["kv_source"][sharer] = sharer
    (folder / "config.json").write_text(json.dumps(config))
    assert_clean_failure(cli("generate", folder), "lacks", f"layers.{sharer}.self_attn")
    with pytest.raises(ValueError, match=f"lacks .*layers.{sharer}.self_attn"):  # the API too, with the shipped code
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


# --- faults: signals, killed runs, concurrent writers ------------------------------------------------------------

def surgery_process(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "surgery", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_leaves_nothing_behind(tiny_models, tmp_path):
    out = tmp_path / "out"
    process = surgery_process("convert", tiny_models["llama"], "--recipe", "none", "--out", out, cwd=tmp_path)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: terminated")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(tiny_models, tmp_path):
    # the command imports torch and transformers first (over a second), then converts for several more
    process = surgery_process("convert", tiny_models["llama"], "--recipe", "none", "--out", tmp_path / "out", cwd=tmp_path)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("error: interrupted")
    assert not (tmp_path / "out").exists()


def test_strays_of_killed_runs_are_removed_and_reported(tiny_models, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stray = tmp_path / f".out.partial-{dead.pid}"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"\0" * 1024)
    result = cli("convert", tiny_models["llama"], "--recipe", "none", "--out", tmp_path / "out", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert not stray.exists() and "left by an interrupted run" in caplog.text
    (tmp_path / "cache").mkdir()
    cache_stray = tmp_path / "cache" / f"model.tmp-{dead.pid}"
    cache_stray.mkdir()
    assert remove_strays(tmp_path / "cache", "model.tmp-") == [cache_stray] and not cache_stray.exists()


def test_live_runs_are_not_strays(tmp_path):
    live = tmp_path / f".out.partial-{os.getppid()}"
    live.mkdir()
    assert remove_strays(tmp_path, ".out.partial-") == [] and live.is_dir()


def test_a_second_writer_to_the_same_out_fails_at_once(tiny_models, tmp_path):
    out = tmp_path / "out"
    with exclusive(out):
        result = cli("convert", tiny_models["llama"], "--recipe", "none", "--out", out, "--no-verify")
    assert_clean_failure(result, "another surgery command is writing")
    assert not out.exists()


def test_an_out_that_appears_meanwhile_is_not_replaced(tiny_models, tmp_path, monkeypatch):
    import surgery.pipelines.convert

    out = tmp_path / "out"
    write_weights = surgery.pipelines.convert.write_weights

    def racing(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("another run's result")
        return write_weights(*args, **kwargs)

    monkeypatch.setattr(surgery.pipelines.convert, "write_weights", racing)
    result = cli("convert", tiny_models["llama"], "--recipe", "none", "--out", out, "--no-verify")
    assert_clean_failure(result, "appeared while")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_loading_the_checkpoint_api_still_works_offline(kvsharer_checkpoint):
    from surgery.checkpoint.loading import load_source_model
    from surgery.checkpoint.sources import resolve

    model = AutoModelForCausalLM.from_pretrained(kvsharer_checkpoint, trust_remote_code=True, dtype=torch.float32)
    ours = load_source_model(resolve(str(kvsharer_checkpoint)))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids).logits)


def test_checkpoints_written_before_the_format_field_still_load(kvsharer_checkpoint, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(kvsharer_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["surgery_format"]
    (folder / "config.json").write_text(json.dumps(config))
    result = cli("generate", folder, "--prompt", "hello", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.stderr
