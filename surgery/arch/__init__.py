"""The remote-code model every converted checkpoint runs; `surgery.checkpoint.export` bundles these files flat.

The names below load on first use (PEP 562), so that a recipe can name one arch module lazily without the whole
model, torch and transformers loading with `surgery --help`.
"""

import importlib

_HOME = {"SurgeryCache": "cache_surgery", "SurgeryConfig": "configuration_surgery",
         "SurgeryForCausalLM": "modeling_surgery", "SurgeryModel": "modeling_surgery"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


__all__ = list(_HOME)
