"""Three offline English corpora that ship with every CPython, disjoint by construction, so that nothing is
downloaded and no measurement runs on text a recipe calibrated on:

- `stdlib-docstrings` (calibration, the default `--calib`): the prose docstrings of half of the standard library's
  modules (every other file, in sorted order), read with `ast`, never imported or executed;
- `python-reference` (perplexity and agreement in `surgery eval`): the Python reference manual's topics
  (`pydoc_data.topics`, the text behind `help('if')`);
- `stdlib-haystack` (retrieval haystacks): the docstrings of the other half of the modules.

A paragraph is kept only when it holds at least `SHINGLE` words and shares no run of `SHINGLE` words with the
reference manual or with the other docstring corpus; paragraphs with doctests (`>>>`) are dropped as code.
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
from pathlib import Path

CALIBRATION, HELDOUT, HAYSTACK = "stdlib-docstrings", "python-reference", "stdlib-haystack"
DEFAULT_CALIBRATION = CALIBRATION
SELF_GENERATED = "self-generated"
NAMES = (CALIBRATION, HELDOUT, HAYSTACK)
SHINGLE = 8  # words: the n-gram length of the overlap check
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "tkinter", "turtledemo",
                    "ensurepip", "pydoc_data", "__pycache__"}


def shingles(text: str) -> set[int]:
    """Hashes of every run of SHINGLE words (lower-cased, punctuation ignored)."""
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i:i + SHINGLE])) for i in range(len(words) - SHINGLE + 1)}


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


@functools.cache
def reference_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def docstrings(path: Path) -> list[str]:
    """The docstrings of a module, its classes and functions, in source order (parsed, not imported)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


def stdlib_files() -> list[Path]:
    library = Path(sysconfig.get_paths()["stdlib"])
    return sorted(path for path in library.rglob("*.py")
                  if not SKIPPED_PACKAGES & set(path.relative_to(library).parts))


@functools.cache
def docstring_corpora() -> tuple[str, str]:
    """(calibration, haystack): the two halves of the stdlib's prose docstrings, with every shared or
    reference-manual SHINGLE-word run removed."""
    seen = [set(), set()]
    kept: list[list[str]] = [[], []]
    reference = shingles(reference_text())
    for index, path in enumerate(stdlib_files()):
        own = index % 2
        for doc in docstrings(path):
            for paragraph in paragraphs(doc):
                if ">>>" in paragraph:
                    continue
                runs = shingles(paragraph)
                if not runs or runs & reference or runs & seen[1 - own]:
                    continue
                seen[own] |= runs
                kept[own].append(paragraph)
    return "\n\n".join(kept[0]), "\n\n".join(kept[1])


def corpus_text(name: str) -> str:
    """The text of one of the named offline corpora."""
    if name == HELDOUT:
        return reference_text()
    calibration, haystack = docstring_corpora()
    return {CALIBRATION: calibration, HAYSTACK: haystack}[name]
