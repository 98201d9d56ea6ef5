"""Load an exported checkpoint the way a user will: a fresh interpreter that cannot import `surgery`, offline."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import SurgeryError

# Runs in the child. `sys.modules["surgery"] = None` makes any import of surgery fail, so only the files
# inside the checkpoint can be used.
VERIFY_SCRIPT = r"""
import json, sys
sys.modules["surgery"] = None
import torch
from transformers import AutoModelForCausalLM
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
ids = torch.tensor([[model.config.bos_token_id or 1, 11, 12, 13, 14, 15]])
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
print(json.dumps({
    "class": type(model).__module__ + "." + type(model).__name__,
    "finite": bool(torch.isfinite(logits).all()),
    "generated": generated.shape[1] - ids.shape[1],
    "kernels": getattr(getattr(sys.modules[type(model).__module__], "decode_attention", None), "__module__", "").split(".")[-1],
}))
"""


def isolated_env(modules_cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=modules_cache, TRANSFORMERS_VERBOSITY="error")
    return env


def verify_checkpoint(folder: Path, timeout: int = 600) -> dict:
    """Forward and a short generate in a subprocess without surgery; raise SurgeryError if either fails."""
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory() as modules_cache:
        result = subprocess.run(
            [sys.executable, "-c", VERIFY_SCRIPT, str(folder)],
            capture_output=True, text=True, timeout=timeout, cwd=folder, env=isolated_env(modules_cache),
        )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SurgeryError(f"the exported checkpoint failed to load without surgery: {last}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if not report["finite"] or report["generated"] != 4:
        raise SurgeryError(f"the exported checkpoint loads but misbehaves: {report}")
    return report
