"""The name the installed transformers gives a model's cache, as a forward and `generate` keyword and as an output
field: `cache` from 5.24 on, `past_key_values` before. Using the installed name keeps stock classes from warning
on every call (the surgery classes take either)."""

from typing import Any

from surgery.arch.modeling_surgery import CACHE_FIELD


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to a forward or `generate`."""
    return {CACHE_FIELD: cache}


def cache_of(outputs: Any) -> Any:
    """The cache a forward returned."""
    return getattr(outputs, CACHE_FIELD)
