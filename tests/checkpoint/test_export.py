"""Export: shards and index, dtype, tied embeddings, carried files, recipe and card, atomic writes, offline loading."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open

import surgery.checkpoint.export as export
from conftest import save_tiny
from helpers import load_remote, run_convert
from surgery.base.errors import SurgeryError
from surgery.checkpoint.verify import VERIFY_SCRIPT, isolated_env, verify_checkpoint


def tensor_names(folder):
    names = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            for name in handle.keys():
                names[name] = handle.get_slice(name).get_dtype()
    return names


def test_sharded_write_with_index(tiny_models, tmp_path):
    out = run_convert(tiny_models["llama"], tmp_path / "out", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:  # each shard respects the limit unless it holds a single larger tensor
        with safe_open(shard, framework="pt") as handle:
            assert len(list(handle.keys())) == 1 or shard.stat().st_size <= 40_000 + 4096
    assert set(index["weight_map"]) == set(tensor_names(out))


def test_dtype_kept_or_changed(tiny_models, tmp_path):
    kept = run_convert(tiny_models["qwen2"], tmp_path / "kept")
    assert set(tensor_names(kept).values()) == {"F32"}
    half = run_convert(tiny_models["qwen2"], tmp_path / "half", dtype="bfloat16")
    assert set(tensor_names(half).values()) == {"BF16"}
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_embeddings_stay_one_tensor(tiny_llama, tmp_path):
    out = run_convert(tiny_llama, tmp_path / "tied")
    names = tensor_names(out)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = load_remote(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_checkpoint_files_recipe_and_card(demo_source, tmp_path):
    out = run_convert("demo", tmp_path / "smol", recipe="none", command="surgery convert demo --recipe none")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "modeling_surgery.py", "configuration_surgery.py", "cache_surgery.py", "recipe.yaml", "README.md"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_surgery.SurgeryForCausalLM"
    record = yaml.safe_load((out / "recipe.yaml").read_text())
    assert record["recipes"][0]["name"] == "none" and record["source"]["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["library_name"] == "transformers" and "surgery" in front["tags"]
    assert front["license"] == "apache-2.0"  # carried from the source card
    assert "trust_remote_code=True" in card and "surgery convert demo --recipe none" in card


@pytest.mark.slow
def test_loads_in_interpreter_without_surgery(tiny_models, tmp_path):
    out = run_convert(tiny_models["qwen3"], tmp_path / "q3", verify=True)
    probe = "import sys; sys.modules['surgery'] = None\ntry:\n    import surgery\nexcept ImportError:\n    print('blocked')"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "blocked"
    result = subprocess.run([sys.executable, "-c", VERIFY_SCRIPT, str(out)], capture_output=True, text=True,
                            cwd=out, env=isolated_env(str(tmp_path / "modules")))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"].endswith("modeling_surgery.SurgeryForCausalLM") and report["generated"] == 4
    assert report["kernels"] == "decode_surgery"  # the checkpoint's own flat copy of the Triton kernels
    assert not report["class"].startswith("surgery.")  # the checkpoint's own files ran, not the package


def test_verify_rejects_broken_checkpoint(tiny_models, tmp_path):
    out = run_convert(tiny_models["llama"], tmp_path / "broken")
    (out / "modeling_surgery.py").write_text("raise ImportError('broken remote code')\n")
    with pytest.raises(SurgeryError, match="failed to load"):
        verify_checkpoint(out)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_out_untouched(tiny_models, tmp_path, monkeypatch, failure):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def explode(*args, **kwargs):
        raise failure("stop in the middle of writing")

    monkeypatch.setattr("surgery.checkpoint.export.write_config", explode)
    with pytest.raises(failure):
        run_convert(tiny_models["llama"], out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_existing_out_needs_overwrite(tiny_models, tmp_path):
    out = run_convert(tiny_models["llama"], tmp_path / "out")
    with pytest.raises(SurgeryError, match="already exists"):
        run_convert(tiny_models["llama"], out)
    run_convert(tiny_models["mistral"], out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["source_model_type"] == "mistral"


def test_conversion_is_deterministic(tiny_llama, tmp_path):
    """Same seed, same plan and same bytes; recipe.yaml records what reproduces it."""
    runs = [run_convert(tiny_llama, tmp_path / f"run{i}", recipe="kvsharer", share_layers=2, threshold=-1.0,
                        num_samples=4, seq_len=16, seed=7) for i in range(2)]
    plans = [yaml.safe_load((run / "recipe.yaml").read_text())["recipes"][0]["plan"] for run in runs]
    assert plans[0] == plans[1]
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()
    record = yaml.safe_load((runs[0] / "recipe.yaml").read_text())
    assert record["calibration"]["seed"] == 7 and record["calibration"]["num_samples"] == 4


def test_source_is_not_touched(tiny_models, tmp_path):
    folder = tiny_models["llama"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    run_convert(folder, tmp_path / "out")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_remote_code_is_flat_and_relative():
    files = export.remote_code_files()
    assert {f.name for f in files} >= {"modeling_surgery.py", "configuration_surgery.py", "cache_surgery.py",
                                       "attention_surgery.py", "budget_surgery.py", "policies_surgery.py",
                                       "matryoshka_surgery.py", "decode_surgery.py", "prefill_surgery.py"}
    for path in files:
        lines = path.read_text().splitlines()
        assert not any(line.strip().startswith("from ..") or line.strip().startswith("import surgery") for line in lines)
        text = "\n".join(lines)
        for line in lines:
            if line.strip().startswith("from surgery"):  # only as the in-package fallback of a flat import
                module = line.split()[1].split(".")[-1]
                assert f"from .{module} import" in text and line.startswith("        ")


def test_verify_offloads_a_checkpoint_larger_than_its_memory_budget(tiny_llama, tmp_path):
    """A model larger than memory is verified with accelerate's disk offload, still without surgery installed."""
    from surgery.checkpoint.verify import verify_checkpoint

    out = run_convert(tiny_llama, tmp_path / "ckpt", recipe="kvsharer", share_layers=2, threshold=-1.0,
                      num_samples=4, seq_len=16)
    report = verify_checkpoint(out, max_memory=60_000)  # far below the checkpoint's size
    assert report["offloaded"] and report["finite"] and report["generated"] == 4
    assert not verify_checkpoint(out)["offloaded"]  # it fits: loaded whole
