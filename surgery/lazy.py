"""Lazy modules: a recipe file names torch at module level, yet `surgery --help` never imports it.

`importlib.util.LazyLoader` (the pattern in Python's importlib docs) puts a module object in `sys.modules` whose
real import runs on the first attribute access, so help and option parsing stay under a second.
"""

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """`name`, imported on first use (or the module itself when something imported it already)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
