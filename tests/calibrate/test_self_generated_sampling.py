"""Self-generated calibration text is sampled over the source's mapped shards, in the source dtype: the same tokens
as a float32 copy for a float32 source, and no copy of the model in anonymous memory."""

import subprocess
import sys
from pathlib import Path

import torch

from factories import save_tiny
from surgery.calibrate.source_model import load_calibration_model, load_sampling_model
from surgery.calibrate.text import self_generated
from surgery.checkpoint.families import surgery_config_from_source
from surgery.checkpoint.sources import resolve


def test_a_float32_source_samples_the_same_tokens_as_a_float32_copy(tmp_path):
    source = resolve(str(save_tiny(tmp_path / "llama", "llama", seed=4)))
    config = surgery_config_from_source(source.config)
    copied = self_generated(load_calibration_model(source, config), None, 3, 20, seed=7)
    mapped = self_generated(load_sampling_model(source, config), None, 3, 20, seed=7)
    assert torch.equal(copied, mapped)


MEASURE = """
import gc, re, sys
from pathlib import Path
import torch
from surgery.calibrate import source_model
from surgery.checkpoint.families import surgery_config_from_source
from surgery.checkpoint.sources import resolve
from surgery.checkpoint.tensor_io import release_freed_memory

def anonymous_mib():
    return int(re.search(r"RssAnon:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

source = resolve(sys.argv[1])
config = surgery_config_from_source(source.config)
gc.collect()
before = anonymous_mib()
model = getattr(source_model, sys.argv[2])(source, config)
gc.collect()
release_freed_memory()  # what the allocator keeps of freed temporaries is not the model
dtypes = sorted({str(p.dtype) for p in model.parameters()})
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(anonymous_mib() - before, weights, *dtypes)
"""


def loaded(folder: Path, loader: str) -> tuple[float, float, list[str]]:
    """(anonymous MiB the loader added, MiB of parameters, their dtypes), in a fresh interpreter each."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), loader], check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0]), float(out[1]), out[2:]


def test_the_sampling_model_holds_no_copy_of_the_weights(tmp_path):
    """A bf16 source of about 45 MB: its float32 copy takes twice that in anonymous memory; the sampling model's
    parameters are the shards' pages, in bf16."""
    folder = save_tiny(tmp_path / "wide", "llama", seed=1, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64, vocab_size=8192, torch_dtype="bfloat16")
    mapped, weights, dtypes = loaded(folder, "load_sampling_model")
    assert dtypes == ["torch.bfloat16"]
    assert mapped < 0.25 * weights, (mapped, weights)
    copied, copied_weights, _ = loaded(folder, "load_calibration_model")
    assert copied > 0.8 * copied_weights  # the float32 copy is visible to this measurement
