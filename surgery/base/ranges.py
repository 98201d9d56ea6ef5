"""Numeric option ranges, declared once in dataclass field metadata and enforced for the CLI and the API alike.

Metadata keys: "min" and "max" (inclusive), "above" and "below" (exclusive). The CLI turns them into click range
types; `check_ranges` applies the same bounds to a dataclass built from Python.
"""

import math
import types
import typing
from dataclasses import Field, fields
from typing import Any

import click

from surgery.base.errors import SurgeryError


def flag_name(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def annotation_of(owner: Any, spec: Field) -> Any:
    return typing.get_type_hints(owner if isinstance(owner, type) else type(owner))[spec.name]


def is_optional(owner: Any, spec: Field) -> bool:
    return type(None) in typing.get_args(annotation_of(owner, spec))


def value_type(owner: Any, spec: Field) -> type:
    """int, float, str or bool: the field's annotation without `| None` (annotations may be strings)."""
    annotation = annotation_of(owner, spec)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float, str, bool) else str


def has_range(spec: Field) -> bool:
    return any(key in spec.metadata for key in ("min", "max", "above", "below"))


def describe(spec: Field) -> str:
    meta = spec.metadata
    parts = []
    if "min" in meta:
        parts.append(f">= {meta['min']}")
    if "above" in meta:
        parts.append(f"> {meta['above']}")
    if "max" in meta:
        parts.append(f"<= {meta['max']}")
    if "below" in meta:
        parts.append(f"< {meta['below']}")
    return " and ".join(parts)


def in_range(spec: Field, value: Any) -> bool:
    meta = spec.metadata
    return not (("min" in meta and value < meta["min"]) or ("above" in meta and value <= meta["above"])
                or ("max" in meta and value > meta["max"]) or ("below" in meta and value >= meta["below"]))


class FiniteFloat(click.ParamType):
    """A float option that must be a finite number, within optional bounds. The one click type of every float
    option: NaN fails every comparison, so a range alone lets `--keep nan` through into a config."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False):
        bounded = low is not None or high is not None
        self.range = click.FloatRange(low, high, min_open=low_open, max_open=high_open) if bounded else None

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return self.range.convert(number, param, ctx) if self.range is not None else number

    def get_metavar(self, *args, **kwargs):
        return self.range.get_metavar(*args, **kwargs) if self.range is not None else None

    def __repr__(self) -> str:
        return repr(self.range) if self.range is not None else "FLOAT"


def click_range(spec: Field, kind: type) -> click.ParamType:
    """A click type with the field's bounds: IntRange, or for a float a `FiniteFloat`."""
    meta = spec.metadata
    low = meta.get("min", meta.get("above"))
    high = meta.get("max", meta.get("below"))
    if kind is float:
        return FiniteFloat(low, high, "above" in meta, "below" in meta)
    return click.IntRange(min=low, max=high, min_open="above" in meta, max_open="below" in meta)


def check_ranges(instance: Any) -> None:
    """Raise SurgeryError for the first field whose value is outside its declared range or choices, or is not a
    flag's boolean: the same checks the CLI makes, for options built from Python or read from a recipe.yaml."""
    for spec in fields(instance):
        value = getattr(instance, spec.name)
        if value is None:
            if not is_optional(instance, spec):
                raise SurgeryError(f"{flag_name(spec.name)} needs a value, got none")
            continue
        choices = spec.metadata.get("choices")
        if choices and value not in choices:
            raise SurgeryError(f"{flag_name(spec.name)} must be one of {', '.join(choices)}, got {value!r}")
        if spec.metadata.get("flag") and not isinstance(value, bool):
            raise SurgeryError(f"{flag_name(spec.name)} is a flag (true or false), got {value!r}")
        kind = value_type(instance, spec)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise SurgeryError(f"{flag_name(spec.name)} must be a whole number, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SurgeryError(f"{flag_name(spec.name)} must be a number, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise SurgeryError(f"{flag_name(spec.name)} must be a finite number, got {value}")
        if kind is str and not isinstance(value, str):
            raise SurgeryError(f"{flag_name(spec.name)} must be text, got {value!r}")
        if not has_range(spec):
            continue
        if not in_range(spec, value):
            raise SurgeryError(f"{flag_name(spec.name)} must be {describe(spec)}, got {value}",
                               hint=f"see `surgery convert --help` for {flag_name(spec.name)}")
