"""`surgery convert --adapt-steps N --push-to-hub REPO`: one conversion, then the same `adapt` and `push` functions
that the `surgery adapt` and `surgery push` commands call."""

import shutil
from dataclasses import dataclass
from pathlib import Path

from surgery.adapt.engine import adapt
from surgery.adapt.settings import AdaptSettings
from surgery.base.errors import SurgeryError
from surgery.base.outputs import check_output
from surgery.checkpoint.hub import PushResult, check_repo_id, push
from surgery.pipelines.convert import ConvertRequest, convert


@dataclass
class Then:
    """What follows the conversion: distillation from the source for `adapt_steps`, and an upload."""

    adapt_steps: int | None = None
    push_to_hub: str | None = None
    private: bool = False


def convert_then(request: ConvertRequest, then: Then) -> PushResult | None:
    """Convert into `request.out`; with `adapt_steps`, convert beside it and adapt into it, the source as teacher;
    then push. Bad input for a later stage (a repo id, an existing --out) fails before any work."""
    if then.push_to_hub:
        check_repo_id(then.push_to_hub)
    out = Path(request.out)
    if then.adapt_steps:
        check_output(out, [Path(request.model)] if Path(request.model).exists() else [])
        if out.exists() and not request.overwrite:
            raise SurgeryError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
        overwrite, request.out = request.overwrite, out.parent / f".{out.name}.converted"
        request.overwrite, request.evaluate = True, False
        try:
            converted = convert(request)
            adapt(converted, out, AdaptSettings(teacher=request.model, steps=then.adapt_steps, seed=request.seed),
                  overwrite=overwrite, verify=request.verify, progress=request.progress,
                  allow_pickle=request.allow_pickle, max_shard_size=request.max_shard_size)
        finally:
            shutil.rmtree(request.out, ignore_errors=True)
            request.out = out
    else:
        convert(request)
    if then.push_to_hub:
        return push(out, then.push_to_hub, private=then.private, verify=request.verify)
    return None
