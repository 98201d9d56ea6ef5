"""Translate a source `config.json` (llama, mistral, qwen2, qwen3, the MoE families mixtral, qwen2_moe, qwen3_moe,
gemma2, gemma3_text, the gemma3 image-text model's language model, and phi3) into the surgery architecture's config.

The families share one decoder and differ in named fields of `SurgeryConfig`: biases, the per-head q/k norm,
sliding windows, whether (and where) the MLP is a mixture of experts, and Gemma's (1 + w) norms, sandwich norms,
scaled embeddings, score scalar, soft-caps and per-type RoPE. So each family is a few lines of field mapping rather
than a model class. Phi-3's fused projections are split by name (`layouts.py`), not in the model.
"""

from typing import Any

import transformers
from transformers import AutoConfig

from surgery.arch.configuration_surgery import SurgeryConfig
from surgery.base.errors import SurgeryError, first_line, root_reason

# The files of a tokenizer that a checkpoint carries over from its source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma2",
                      "gemma3_text", "gemma3", "phi3")
# Image-text sources whose language model converts, to a text-only checkpoint.
TEXT_OF = {"gemma3": "gemma3_text"}

_COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)


def _family_fields(model_type: str, source: Any) -> dict[str, Any]:
    """The fields in which the families differ."""
    if model_type == "llama":
        return {
            "attention_bias": source.attention_bias,
            "attention_out_bias": source.attention_bias,
            "mlp_bias": source.mlp_bias,
        }
    if model_type == "mistral":
        window = source.sliding_window
        return {
            "sliding_window": window,
            "layer_types": ["sliding_attention" if window else "full_attention"] * source.num_hidden_layers,
        }
    if model_type == "qwen2":
        return {
            "attention_bias": True,
            "sliding_window": source.sliding_window,
            "layer_types": list(source.layer_types),
        }
    if model_type == "qwen3":
        return {
            "attention_bias": source.attention_bias,
            "attention_out_bias": source.attention_bias,
            "qk_norm": True,
            "sliding_window": source.sliding_window,
            "layer_types": list(source.layer_types),
        }
    if model_type == "mixtral":  # mistral's attention; every layer's MLP is 8 experts of intermediate_size
        window = source.sliding_window
        return {
            "sliding_window": window,
            "layer_types": ["sliding_attention" if window else "full_attention"] * source.num_hidden_layers,
            **_experts(source, range(source.num_hidden_layers), source.intermediate_size, normalise=True),
        }
    if model_type in ("gemma2", "gemma3_text"):
        return _gemma_fields(source, qk_norm=model_type == "gemma3_text")
    if model_type == "phi3":  # fused qkv_proj / gate_up_proj are split by name (layouts.py); no biases
        window = source.sliding_window
        return {"sliding_window": window,
                "layer_types": ["sliding_attention" if window else "full_attention"] * source.num_hidden_layers}
    if model_type in ("qwen2_moe", "qwen3_moe"):
        sparse = [layer for layer in range(source.num_hidden_layers) if layer not in (source.mlp_only_layers or [])
                  and expert_count(source) > 0 and (layer + 1) % source.decoder_sparse_step == 0]
        experts = _experts(source, sparse, source.moe_intermediate_size, normalise=source.norm_topk_prob)
        if model_type == "qwen2_moe":  # qkv_bias: transformers before it was a field always biased q, k, v
            return {"attention_bias": getattr(source, "qkv_bias", True), "sliding_window": source.sliding_window or None,
                    "layer_types": list(source.layer_types), **experts,
                    "moe_shared_intermediate_size": source.shared_expert_intermediate_size or None}
        return {"attention_bias": source.attention_bias, "attention_out_bias": source.attention_bias, "qk_norm": True,
                "sliding_window": source.sliding_window,
                "layer_types": list(getattr(source, "layer_types", None) or ["full_attention"] * source.num_hidden_layers),
                **experts}
    raise unsupported(model_type)


def _gemma_fields(source: Any, qk_norm: bool) -> dict[str, Any]:
    """Gemma 2 and 3: GeGLU, (1 + w) norms around both blocks, embeddings × sqrt(hidden), scores scaled by
    query_pre_attn_scalar, soft-caps (Gemma 2), interleaved sliding layers, per-type RoPE (Gemma 3)."""
    if getattr(source, "use_bidirectional_attention", None):
        raise SurgeryError(f"this {source.model_type} model attends bidirectionally (an embedding model)",
                           hint="convert a causal language model")
    return {"hidden_act": source.hidden_activation, "attention_bias": source.attention_bias,
            "attention_out_bias": source.attention_bias, "qk_norm": qk_norm, "sliding_window": source.sliding_window,
            "layer_types": list(source.layer_types), "norm_unit_offset": True, "sandwich_norms": True,
            "embedding_scale": source.hidden_size**0.5, "query_pre_attn_scalar": source.query_pre_attn_scalar,
            "attn_logit_softcapping": source.attn_logit_softcapping,
            "final_logit_softcapping": source.final_logit_softcapping}


def expert_count(source: Any) -> int:
    """Experts per MoE layer; the field's name varies by family and transformers version."""
    return getattr(source, "num_local_experts", None) or getattr(source, "num_experts", None) or 0


def _experts(source: Any, layers, width: int, normalise: bool) -> dict[str, Any]:
    """The MoE fields: which layers hold experts, how many, their width, top-k and its renormalisation."""
    return {"moe_layers": list(layers), "moe_experts": expert_count(source), "moe_top_k": source.num_experts_per_tok,
            "moe_intermediate_size": width, "moe_norm_topk": bool(normalise)}


def unsupported(model_type: str | None) -> SurgeryError:
    return SurgeryError(
        f"unsupported model_type {model_type!r}: surgery converts {', '.join(SUPPORTED_FAMILIES)}",
        hint="pick a model of a supported family",
    )


def read_model_type(config_dict: Any) -> str:
    if not isinstance(config_dict, dict):
        raise SurgeryError(f"config.json holds a {type(config_dict).__name__}, not a JSON object",
                           hint="fix config.json of the source model")
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_FAMILIES and model_type != SurgeryConfig.model_type:
        raise unsupported(model_type)
    return model_type


# Fields that must be positive integers for any decoder to be built from the config.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_DROPPED_FIELDS = ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version")


def _check_dimensions(config_dict: dict[str, Any], complete: bool = True) -> None:
    """Reject the values no model can be built from, naming the field, before transformers sees them; `complete`:
    the required fields must be there (a nested text config may leave them to the family's defaults)."""
    def positive_int(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SurgeryError(f"config.json: {name} must be a positive integer, got {value!r}",
                               hint="fix config.json of the source model")

    for name in _POSITIVE_INTS:
        if name not in config_dict:
            if not complete:
                continue
            raise SurgeryError(f"config.json has no {name}", hint="fix config.json of the source model")
        positive_int(name, config_dict[name])
    for name in _OPTIONAL_POSITIVE_INTS:
        if config_dict.get(name) is not None and not (name == "sliding_window" and config_dict[name] == 0):
            positive_int(name, config_dict[name])  # Qwen2-MoE writes sliding_window 0 for "none"
    if "num_attention_heads" not in config_dict:
        return
    heads, kv_heads = config_dict["num_attention_heads"], config_dict.get("num_key_value_heads") or config_dict["num_attention_heads"]
    if heads % kv_heads:
        raise SurgeryError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
                           hint="fix config.json of the source model")
    if config_dict.get("head_dim") is None and config_dict.get("hidden_size", heads) % heads:
        raise SurgeryError(f"config.json: hidden_size {config_dict['hidden_size']} is not a multiple of "
                           f"num_attention_heads {heads}", hint="set head_dim, or fix config.json")


def source_config(config_dict: dict[str, Any]):
    """The family's transformers config for a source `config.json` dict, built without executing remote code."""
    model_type = read_model_type(config_dict)
    if model_type == SurgeryConfig.model_type:
        raise SurgeryError("the source is already a surgery checkpoint", hint="convert the original model instead")
    if model_type in TEXT_OF:
        text = config_dict.get("text_config")
        if not isinstance(text, dict):
            raise SurgeryError(f"config.json of this {model_type} model has no text_config",
                               hint="fix config.json of the source model")
        _check_dimensions(text, complete=False)  # the rest are the family's defaults
    else:
        _check_dimensions(config_dict)
    fields = {k: v for k, v in config_dict.items() if k not in _DROPPED_FIELDS}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as error:  # strict dataclass validation raises its own types
        raise SurgeryError(f"config.json is not a valid {model_type} config: {root_reason(error)}",
                           hint="fix config.json of the source model") from None


def language_config(source):
    """The config of the language model: the source's own, or an image-text model's text config."""
    return source.text_config if source.model_type in TEXT_OF else source


def language_fields(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields of a config.json (vocab_size, max_position_embeddings, ...): an image-text
    model's text config with its family's defaults filled in, else the dict as it is."""
    if isinstance(config_dict, dict) and config_dict.get("model_type") in TEXT_OF:
        return language_config(source_config(config_dict)).to_dict()
    return config_dict


def surgery_config_from_source(config_dict: dict[str, Any]) -> SurgeryConfig:
    """Build the identity-plan surgery config for a source `config.json` dict (without executing remote code)."""
    source = language_config(source_config(config_dict))
    model_type = source.model_type
    kwargs = {name: getattr(source, name) for name in _COMMON_FIELDS if getattr(source, name, None) is not None}
    kwargs.update(_family_fields(model_type, source))
    kwargs["source_model_type"] = config_dict["model_type"]
    kwargs["grown_layers"] = config_dict.get("grown_layers") or None  # a plain checkpoint that depth growth made
    kwargs["dtype"] = config_dict.get("dtype") or config_dict.get("torch_dtype")
    try:
        return SurgeryConfig(**kwargs)
    except Exception as error:  # strict dataclass validation raises its own types
        raise SurgeryError(f"config.json cannot be converted: {root_reason(error)}", hint="fix config.json of the source model") from None


# The MoE family that keeps a dense family's attention, for a model that upcycling gave experts.
MOE_FAMILY_OF = {"llama": "qwen2_moe", "mistral": "qwen2_moe", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
# What a plain family checkpoint must reproduce of the planned model, checked by converting its config back.
_ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
                        "rope_parameters", "attention_bias", "attention_out_bias", "mlp_bias", "qk_norm",
                        "layer_types", "moe_layers", "moe_experts", "moe_top_k", "moe_intermediate_size",
                        "moe_norm_topk", "moe_shared_intermediate_size", "grown_layers", "norm_unit_offset",
                        "sandwich_norms", "embedding_scale", "query_pre_attn_scalar", "attn_logit_softcapping",
                        "final_logit_softcapping")
# Families whose checkpoints store tensors the surgery model splits (Phi-3's fused projections): a model that only
# depth growth or upcycling changed is written as a surgery checkpoint instead of a plain one.
FUSED_FAMILIES = ("phi3",)


def plain_family_config(config_dict: dict[str, Any], model: SurgeryConfig):
    """The transformers config of a plain checkpoint (no remote code) for a model that only depth growth and
    upcycling changed: the source family's (an image-text source's language model), deepened; or, where upcycling
    gave a dense source experts, the MoE family with its attention (Qwen2-MoE for llama, mistral and qwen2;
    Qwen3-MoE for qwen3). None where no plain family holds the model's layout (Phi-3's fused projections, experts
    on Gemma or Phi-3): it is then written as a surgery checkpoint. Refused, in one line, when the family cannot
    hold the model exactly."""
    model_type = read_model_type(config_dict)
    if model_type in TEXT_OF:
        config_dict = {**language_fields(config_dict), "model_type": TEXT_OF[model_type]}
        model_type = TEXT_OF[model_type]
    if model_type in FUSED_FAMILIES:
        return None
    if model.moe_layers is not None and not expert_count(source_config(config_dict)):
        if model_type not in MOE_FAMILY_OF:
            return None
        family = source_config(_upcycled_fields(model, MOE_FAMILY_OF[model_type]))
    else:
        fields = dict(config_dict)
        fields["num_hidden_layers"] = model.num_hidden_layers
        if fields.get("layer_types") is not None:
            fields["layer_types"] = list(model.layer_types)
        fields["grown_layers"] = list(model.grown_layers or [])
        if model.moe_layers is not None and model_type in ("qwen2_moe", "qwen3_moe"):
            fields["decoder_sparse_step"] = 1  # the sparse layers, said explicitly: the grown stack breaks the step rule
            fields["mlp_only_layers"] = [i for i in range(model.num_hidden_layers) if i not in model.moe_layers]
        family = source_config(fields)
    _check_holds(family, model)
    return family


def _upcycled_fields(model: SurgeryConfig, model_type: str) -> dict[str, Any]:
    """A Qwen MoE config for a dense model with experts in `model.moe_layers` and no shared expert."""
    fields = {name: getattr(model, name) for name in _COMMON_FIELDS if getattr(model, name, None) is not None}
    sliding = "sliding_attention" in model.layer_types
    fields.update(model_type=model_type, num_experts=model.moe_experts, num_experts_per_tok=model.moe_top_k,
                  moe_intermediate_size=model.moe_intermediate_size, norm_topk_prob=model.moe_norm_topk,
                  decoder_sparse_step=1, use_sliding_window=sliding, sliding_window=model.sliding_window,
                  mlp_only_layers=[i for i in range(model.num_hidden_layers) if i not in model.moe_layers])
    if model.grown_layers:
        fields["grown_layers"] = list(model.grown_layers)
    if model_type == "qwen2_moe":  # no shared expert: width 0 (its gate, which scales nothing, is written as zeros)
        fields.update(qkv_bias=model.attention_bias, shared_expert_intermediate_size=0,
                      layer_types=list(model.layer_types), max_window_layers=model.num_hidden_layers)
    else:
        fields.update(attention_bias=model.attention_bias)
    return fields


def _check_holds(family, model: SurgeryConfig) -> None:
    """Converting the family config back must give the planned model, field by field."""
    back = surgery_config_from_source(family.to_dict())
    for name in _ARCHITECTURE_FIELDS:
        if getattr(back, name) != getattr(model, name) and (getattr(back, name) or getattr(model, name)):
            raise SurgeryError(f"a plain {family.model_type} checkpoint cannot hold this model: its {name} would be "
                               f"{getattr(back, name)!r}, not {getattr(model, name)!r}",
                               hint="add a recipe that rewrites attention to get a surgery checkpoint, or convert a "
                                    "model without that feature")
    windows = [getattr(config, "sliding_window", None) if "sliding_attention" in config.layer_types else None
               for config in (back, model)]
    if windows[0] != windows[1]:
        raise SurgeryError(f"a plain {family.model_type} checkpoint cannot hold this model's sliding window "
                           f"{windows[1]}", hint="add a recipe that rewrites attention to get a surgery checkpoint")


def family_model_class(model_type: str):
    """The family's transformers class (e.g. LlamaForCausalLM), for sources and plain checkpoints."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
