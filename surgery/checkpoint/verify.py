"""Load an exported checkpoint the way a user will: a fresh interpreter that cannot import `surgery`, offline."""

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from surgery.base.errors import SurgeryError
from surgery.base.memory import available_memory

log = logging.getLogger(__name__)

# Runs in the child. `sys.modules["surgery"] = None` makes any import of surgery fail, so only the files
# inside the checkpoint can be used.
VERIFY_SCRIPT = r"""
import json, sys
sys.modules["surgery"] = None
import torch
from transformers import AutoModelForCausalLM
path = sys.argv[1]
max_memory = int(sys.argv[2]) if len(sys.argv) > 2 else 0  # bytes to keep resident; 0: load whole
kwargs = {}
if max_memory:  # larger than memory: accelerate keeps what fits and reads the rest from disk, layer by layer
    kwargs = dict(device_map="auto", max_memory={"cpu": max_memory}, offload_folder=sys.argv[3])
remote_code = len(sys.argv) < 5 or sys.argv[4] == "1"  # a plain family checkpoint must load without it
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote_code, **kwargs).eval()
ids = torch.tensor([[model.config.bos_token_id or 1, 11, 12, 13, 14, 15]])
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                               do_sample=False)  # an early end-of-sequence token is no failure
print(json.dumps({
    "class": type(model).__module__ + "." + type(model).__name__,
    "finite": bool(torch.isfinite(logits).all()),
    "generated": generated.shape[1] - ids.shape[1],
    "offloaded": "disk" in (getattr(model, "hf_device_map", None) or {}).values(),
    "kernels": getattr(getattr(sys.modules[type(model).__module__], "decode_attention", None), "__module__", "").split(".")[-1],
}))
"""


def isolated_env(modules_cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=modules_cache, TRANSFORMERS_VERBOSITY="error")
    return env


def offload_budget(folder: Path) -> int:
    """0 when the checkpoint fits comfortably in memory; else the bytes it may keep resident (the rest offloaded)."""
    size = sum(shard.stat().st_size for shard in Path(folder).glob("*.safetensors"))
    available = available_memory()
    if not available or size <= available // 2:
        return 0
    log.info("the checkpoint (%.1f GiB) is over half the free memory: verifying with layers offloaded to disk",
             size / 2**30)
    return available // 4


def verify_checkpoint(folder: Path, timeout: int = 1800, max_memory: int | None = None, remote_code: bool = True) -> dict:
    """Forward and a short generate in a subprocess without surgery; raise SurgeryError if either fails.
    `max_memory` (bytes; default: from the free memory) bounds what the child keeps resident; `remote_code`
    False loads with stock transformers classes only (a plain family checkpoint)."""
    folder = Path(folder).resolve()
    budget = offload_budget(folder) if max_memory is None else max_memory
    with tempfile.TemporaryDirectory() as modules_cache, tempfile.TemporaryDirectory() as offload:
        result = subprocess.run(
            [sys.executable, "-c", VERIFY_SCRIPT, str(folder), str(budget), offload, "1" if remote_code else "0"],
            capture_output=True, text=True, timeout=timeout, cwd=folder, env=isolated_env(modules_cache),
        )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SurgeryError(f"the exported checkpoint failed to load without surgery: {last}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if not report["finite"] or report["generated"] != 4:
        raise SurgeryError(f"the exported checkpoint loads but misbehaves: {report}")
    return report
