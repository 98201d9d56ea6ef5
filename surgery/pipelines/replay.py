"""`surgery convert --recipe-file recipe.yaml`: the conversion a checkpoint's recipe.yaml records, run again.

Recipes, their options, the calibration text, sample count, length, seed and batch size, the compute device and
dtype, and the export dtype and shard size all come from the file, so the replay writes byte-identical
safetensors (given the same source, surgery and Python version: the default calibration corpus is read from
Python's own standard library).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.base.errors import SurgeryError
from surgery.checkpoint.records import load_recipe_file
from surgery.pipelines.convert import ConvertRequest
from surgery.recipes import recipes_from_record

HINT = "pass the recipe.yaml of a checkpoint written by `surgery convert`"


def recorded(record: dict[str, Any], section: str, key: str, kind: type, path: Path) -> Any:
    """record[section][key], which must be a `kind`; one line naming it otherwise."""
    entries = record.get(section)
    value = entries.get(key) if isinstance(entries, dict) else None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SurgeryError(f"{path} has no valid {section}.{key}", hint=HINT)
    return value


def replayed_request(path: Path, model: str | None):
    """A ConvertRequest from a recipe.yaml; MODEL, when given, replaces the recorded source (e.g. a local copy)."""

    if not Path(path).is_file():
        raise SurgeryError(f"no such recipe file: {path}", hint=HINT)
    record = load_recipe_file(Path(path))
    recipes = recipes_from_record(record)
    if not recipes:
        raise SurgeryError(f"{path} lists no recipes", hint=HINT)
    source = model or recorded(record, "source", "model", str, path)
    request = ConvertRequest(model=source, recipes=recipes, out=Path("."),
                             dtype=recorded(record, "export", "dtype", str, path),
                             max_shard_size=recorded(record, "export", "max_shard_size", int, path))
    if record.get("calibration") is not None:
        request.calib = recorded(record, "calibration", "source", str, path)
        request.num_samples = recorded(record, "calibration", "num_samples", int, path)
        request.seq_len = recorded(record, "calibration", "seq_len", int, path)
        request.seed = recorded(record, "calibration", "seed", int, path)
        request.calib_batch_size = recorded(record, "calibration", "batch_size", int, path)
        request.device = recorded(record, "calibration", "device", str, path)
        request.compute_dtype = recorded(record, "calibration", "compute_dtype", str, path)
    for name, minimum in (("num_samples", 1), ("seq_len", 2), ("calib_batch_size", 1), ("max_shard_size", 1)):
        if getattr(request, name) is not None and getattr(request, name) < minimum:
            raise SurgeryError(f"{path} records {name} = {getattr(request, name)}, below {minimum}", hint=HINT)
    return request
