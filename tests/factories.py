"""Tiny random models for the tests, built in one place: a folder of each supported family (from its transformers
config class), and a surgery model built straight from a `SurgeryConfig` with a plan."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from surgery.arch import SurgeryConfig, SurgeryForCausalLM

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
    # Gemma: sliding and global layers alternate (Gemma 3: its local layers with their own RoPE base), a score
    # scalar that is not head_dim, and soft-caps small enough to bite on random weights
    "gemma2": {"sliding_window": 6, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 3.0},
    "gemma3_text": {"sliding_window": 6, "query_pre_attn_scalar": 24,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}},
    # Phi-3: fused projections; a partial rotary as Phi-4-mini has it; no sliding window (as Phi-3.5 and Phi-4)
    "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
}
# Image-text sources: the language model's fields go in text_config, with a tiny vision tower beside it.
TEXT_FAMILIES = {"gemma3": "gemma3_text"}
ALL_FAMILIES = [*FAMILY_EXTRAS, *TEXT_FAMILIES]
TINY_VISION = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}


def tiny_config(family: str, **overrides):
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    if family in TEXT_FAMILIES:
        text = tiny_config(TEXT_FAMILIES[family], **overrides).to_dict()
        return AutoConfig.for_model(family, text_config=text, vision_config=TINY_VISION, mm_tokens_per_image=4,
                                    tie_word_embeddings=text["tie_word_embeddings"])
    kwargs.update(FAMILY_EXTRAS[family])
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def save_tiny(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    with torch.no_grad():  # some families start their routers at zero (every expert tied), Gemma its norms
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(0, 0.5)
            elif name.endswith("norm.weight"):
                parameter.add_(torch.randn_like(parameter) * 0.2)
    model.save_pretrained(folder)
    return folder


def tiny_surgery_model(seed: int = 0, layers: int = 4, head_dim: int = 8, max_positions: int = 256,
                       **plan) -> SurgeryForCausalLM:
    """A surgery model of 6 query and 2 KV heads over a hidden size of 48, with a plan (kv_source, kv_policy, ...)
    given as config fields."""
    config = SurgeryConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=head_dim,
                           max_position_embeddings=max_positions,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **plan)
    torch.manual_seed(seed)
    return SurgeryForCausalLM(config).eval()
