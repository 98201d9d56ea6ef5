"""Checkpoint formats: a format-1 checkpoint (recipe keys before they were named after their recipe) still loads
with stock transformers through its own remote code, and this package reads it in the current keys."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli
from surgery.checkpoint.loading import load_source_model, read_checkpoint_config
from surgery.checkpoint.sources import resolve

FORMAT_1 = Path(__file__).parents[1] / "data" / "format1_attention_gate"


def test_format_1_is_read_in_the_current_keys(tmp_path):
    folder = shutil.copytree(FORMAT_1, tmp_path / "old")
    config = read_checkpoint_config(folder)
    assert config.attention_gate_heads == 1 and config.attention_gate_width == 2
    assert config.surgery_format == 3
    result = cli("inspect", folder)
    assert result.exit_code == 0, result.stderr
    assert "attention-gate" in result.output


# Stock transformers and the folder's own code, in an interpreter that cannot import surgery.
STOCK = """
import sys; sys.modules["surgery"] = None
import pytest
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""


def test_format_1_gives_the_same_logits_with_its_own_code_and_with_ours(tmp_path):
    folder = shutil.copytree(FORMAT_1, tmp_path / "old")
    subprocess.run([sys.executable, "-c", STOCK, str(folder), str(tmp_path / "logits.pt")], check=True)
    expected = torch.load(tmp_path / "logits.pt")
    ours = load_source_model(resolve(str(folder)))
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ours(ids).logits
        cache = ours(ids, use_cache=True).past_key_values
    assert cache.kept_fraction() < 1  # the redrawn gates evict, so the renamed gate keys really are read
    assert (expected - got).abs().max() < 1e-5


def test_a_broken_format_1_config_is_one_line_and_changes_nothing(tmp_path):
    """Reading an older format renames keys in memory only: a bad value in it fails in one line, and the folder
    is left exactly as it was."""
    import json

    from helpers import assert_clean_failure

    folder = shutil.copytree(FORMAT_1, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    config["kv_gate_threshold"] = 2.0  # a format-1 key, out of its range
    (folder / "config.json").write_text(json.dumps(config))
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert_clean_failure(cli("inspect", folder), "not a valid surgery config")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_format_2_is_read_unless_it_gates_sliding_layers(tiny_models, tmp_path):
    """Format 2 put a gate on sliding-window layers too, which format 3 leaves ungated: such a checkpoint is refused
    in one line rather than run with gates left out; any other format-2 checkpoint reads as it is."""
    import json

    from helpers import run_convert
    from surgery.base.errors import SurgeryError

    plain = run_convert(tiny_models["qwen2"], tmp_path / "plain", "none")
    gated = run_convert(tiny_models["qwen2"], tmp_path / "gated", "attention-gate")
    for folder in (plain, gated):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "surgery_format": 2}))
    assert read_checkpoint_config(plain).surgery_format == 3
    with pytest.raises(SurgeryError, match="gates sliding-window layers"):
        read_checkpoint_config(gated)
