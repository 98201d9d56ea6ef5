"""Lazy modules: a recipe file names torch, or the arch module it plans for, at module level, yet `surgery --help`
never imports them.

- Third-party modules go through `importlib.util.LazyLoader` (the pattern in Python's importlib docs): a module
  object in `sys.modules` whose real import runs on the first attribute access.
- This package's own modules go through `DeferredModule`, a stand-in that runs an ordinary import on first use and
  is never put in `sys.modules`. A LazyLoader module of ours would sit half-initialised in `sys.modules` while it
  runs, so a `from ... import name` of it elsewhere during that time would fail.
`tests/test_layers.py` reads every `lazy_import("surgery...")` as an import, so the ladder holds for these too.
"""

import importlib
import importlib.util
import sys
from types import ModuleType


class DeferredModule:
    """Stands in for one of this package's modules until an attribute is read, then imports it normally."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


def lazy_import(name: str) -> ModuleType:
    """`name`, imported on first use (or the module itself when something imported it already)."""
    if name in sys.modules:
        return sys.modules[name]
    if name.split(".")[0] == __name__.split(".")[0]:
        return DeferredModule(name)  # type: ignore[return-value]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
