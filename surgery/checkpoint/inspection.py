"""`surgery inspect`: what a model is and how many KV bytes each token costs it."""

from math import prod

from surgery.checkpoint.families import surgery_config_from_source
from surgery.checkpoint.sources import resolve
from surgery.checkpoint.tensor_io import LazyCheckpoint
from surgery.checkpoint.loading import read_checkpoint_config

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def describe(model: str, allow_pickle: bool = False) -> dict[str, str]:
    source = resolve(model, allow_pickle=allow_pickle)
    if source.model_type == "surgery":

        config = read_checkpoint_config(source.folder)
    else:
        config = surgery_config_from_source(source.config)
    checkpoint = LazyCheckpoint(source.folder)
    dtype = str(checkpoint.dtype()).removeprefix("torch.")
    parameters = 0
    for shard in checkpoint.shards():
        from safetensors import safe_open

        with safe_open(checkpoint.folder / shard, framework="pt") as handle:
            parameters += sum(prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    per_layer = 2 * config.num_key_value_heads * config.head_dim * DTYPE_BYTES.get(dtype, 4)
    growing = len(config.full_attention_owners)  # a sliding layer's cache stops growing at its window
    sliding = len(config.owner_layers) - growing
    info = {
        "model": source.name,
        "folder": str(source.folder),
        "family": config.source_model_type or source.model_type,
        "layers": str(config.num_hidden_layers),
        "hidden size": str(config.hidden_size),
        "attention heads": str(config.num_attention_heads),
        "kv heads": str(config.num_key_value_heads),
        "head dim": str(config.head_dim),
        "vocab": str(config.vocab_size),
        "context": str(config.max_position_embeddings),
        "parameters (stored)": f"{parameters / 1e6:.1f}M",
        "dtype": dtype,
        f"KV bytes/token ({dtype})": f"{growing * per_layer:,} ({growing} full-attention layers with a cache)",
    }
    if sliding:
        window = config.sliding_window
        info["sliding-window layers"] = (f"{sliding} with a cache, window {window}: at most "
                                         f"{sliding * per_layer * (window - 1):,} bytes in all (window − 1 tokens each)")
    if config.sharing_layers:
        info["sharing layers"] = ", ".join(f"{i}->{config.kv_source[i]}" for i in config.sharing_layers)
    if config.moe_layers:
        expert = 3 * config.hidden_size * config.moe_intermediate_size  # gate, up and down projections
        null = config.adamoe_null_experts  # AdaMoE: a token runs at most top-k true experts, fewer when it picks nulls
        idle = len(config.moe_layers) * (config.moe_experts - min(config.moe_top_k, config.moe_experts)) * expert
        info["experts"] = (f"{config.moe_experts} per layer on {len(config.moe_layers)} of {config.num_hidden_layers} "
                           f"layers, top-{config.moe_top_k}" + (f" of them and {null} null experts" if null else "")
                           + (", plus a shared expert" if config.moe_shared_intermediate_size else ""))
        info["active parameters per token"] = ("at most " if null else "") + f"{(parameters - idle) / 1e6:.1f}M"
    if config.grown_layers:
        info["new layers (depth growth)"] = ", ".join(map(str, config.grown_layers))
    if config.surgery_recipes:
        info["recipes"] = ", ".join(config.surgery_recipes)
    return info
