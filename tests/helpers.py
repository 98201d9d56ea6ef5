"""Shared test helpers: convert in-process and load checkpoints the way users do."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from surgery.convert import ConvertRequest, convert
from surgery.recipes import recipe_class


def run_convert(model: str | Path, out: Path, recipe: str = "none", verify: bool = False, **options) -> Path:
    recipe_options = {k: options.pop(k) for k in list(options) if k in ("share_layers", "ratio", "threshold", "order")}
    request = ConvertRequest(model=str(model), recipes=[recipe_class(recipe)(**recipe_options)], out=out,
                             verify=verify, progress=False, **options)
    return convert(request)


def load_remote(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def load_reference(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
