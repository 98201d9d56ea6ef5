"""Calibration data: every input kind, deterministic windows, and the offline defaults."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from surgery.arch import SurgeryConfig, SurgeryForCausalLM
from surgery.calibrate.text import heldout_text, read_text, self_generated, windows
from surgery.base.errors import SurgeryError

TEXTS = ["first document about rivers", "second document about mountains"]


def test_reads_txt_jsonl_parquet_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "c.parquet")
    assert read_text(str(tmp_path / "a.txt")) == TEXTS[0]
    assert read_text(str(tmp_path / "b.jsonl")) == "\n\n".join(TEXTS)
    assert read_text(str(tmp_path / "c.parquet")) == "\n\n".join(TEXTS)
    folder_text = read_text(str(tmp_path))
    assert all(t in folder_text for t in TEXTS)


def test_reads_saved_dataset_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    assert read_text(str(tmp_path / "ds")) == "\n\n".join(TEXTS)


def test_bad_calibration_inputs(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(SurgeryError, match="bad.jsonl:1 is not valid JSON"):
        read_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(SurgeryError, match="no such calibration file"):
        read_text(str(tmp_path / "missing.txt"))


def test_windows_are_deterministic_per_seed():
    stream = torch.arange(1000)
    first, again, other = windows(stream, 5, 16, seed=3), windows(stream, 5, 16, seed=3), windows(stream, 5, 16, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    for row in first:  # each window is a contiguous slice of the stream
        assert torch.equal(row, torch.arange(row[0], row[0] + 16))
    with pytest.raises(SurgeryError, match="fewer than --seq-len"):
        windows(torch.arange(10), 1, 16, seed=0)


def test_self_generated_calibration_is_seeded():
    config = SurgeryConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1)
    model = SurgeryForCausalLM(config).eval()
    a, b = self_generated(model, None, 3, 12, seed=5), self_generated(model, None, 3, 12, seed=5)
    c = self_generated(model, None, 3, 12, seed=6)
    assert a.shape == (3, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 1).all()


def test_heldout_text_is_real_prose():
    text = heldout_text()
    assert len(text) > 100_000 and "statement" in text
