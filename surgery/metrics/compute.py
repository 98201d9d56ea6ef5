"""The compute a model actually spent: tokens that entered each layer, counted by the routers (MoDification), tokens
each expert ran, counted by the mixtures of experts (MoE families, AdaMoE), and the matmul FLOPs per token that
follow from those counts. A dense layer counts every token through its one MLP."""

from __future__ import annotations

from typing import Any


def _layers(model) -> list:
    return list(getattr(getattr(model, "model", None), "layers", []))


def routers(model) -> dict[int, Any]:
    """{layer index: router} of a routed surgery model; empty for any other model."""
    return {i: layer.router for i, layer in enumerate(_layers(model)) if getattr(layer, "router", None) is not None}


def expert_blocks(model) -> dict[int, Any]:
    """{layer index: mixture of experts} of a surgery model; empty for a dense one or a transformers class."""
    return {i: layer.mlp for i, layer in enumerate(_layers(model)) if hasattr(getattr(layer, "mlp", None), "dispatched")}


def reset_counts(model) -> None:
    for counter in (*routers(model).values(), *expert_blocks(model).values()):
        counter.reset_counts()


def attention_matmul_flops(config) -> int:
    """Multiply-adds × 2 of one token through one layer's q, k, v and o projections."""
    heads = 2 * config.num_attention_heads + 2 * config.num_key_value_heads
    return 2 * config.hidden_size * config.head_dim * heads


def dense_mlp_flops(config) -> int:
    """Multiply-adds × 2 of one token through a gated MLP of intermediate_size."""
    return 2 * 3 * config.hidden_size * config.intermediate_size


def layer_matmul_flops(config) -> int:
    """Multiply-adds × 2 of one token through one dense decoder layer's projections and MLP (attention scores, which
    grow with the context, are not included)."""
    return attention_matmul_flops(config) + dense_mlp_flops(config)


def expert_mlp_flops(config, experts_per_token: float) -> float:
    """Multiply-adds × 2 of one token through a mixture of experts: its router over every row (null experts' too),
    the true experts it was dispatched to, and the shared expert with its gate where there is one."""
    hidden = config.hidden_size
    router = hidden * (config.moe_experts + getattr(config, "adamoe_null_experts", 0))
    shared = config.moe_shared_intermediate_size or 0
    shared = 3 * hidden * shared + hidden if shared else 0
    return 2 * (router + experts_per_token * 3 * hidden * config.moe_intermediate_size + shared)


def measured_compute(model) -> dict[str, Any] | None:
    """Since the last `reset_counts`, from what the model actually ran: the share of (token, routed layer) passes
    skipped (routers), the true experts per token (mixtures of experts), and the projection and MLP FLOPs per
    token over all layers (a batch whose rows route different counts runs padding too). None for a model that
    counts nothing (dense, or a transformers class)."""
    found, experts = routers(model), expert_blocks(model)
    if not any(router.seen_tokens for router in found.values()) and not any(b.tokens for b in experts.values()):
        return None
    config, result = model.config, {}
    if found:
        skipped = {layer: 1 - router.routed_tokens / router.seen_tokens for layer, router in found.items()}
        result.update(tokens_skipped=sum(skipped.values()) / len(skipped), skipped_per_layer=skipped)
    per_layer = {layer: sum(block.dispatched) / block.tokens for layer, block in experts.items() if block.tokens}
    if per_layer:
        result.update(experts_per_token=sum(per_layer.values()) / len(per_layer), experts_per_layer=per_layer)
    flops = mlp = 0.0
    for layer in range(config.num_hidden_layers):
        router = found.get(layer)
        # what a routed layer ran, per token seen: routed tokens plus the padding of batch rows that routed fewer
        ran = router.computed_tokens / router.seen_tokens if router is not None else 1.0
        layer_mlp = (expert_mlp_flops(config, per_layer.get(layer, 0.0)) if layer in experts
                     else dense_mlp_flops(config))
        flops += ran * (attention_matmul_flops(config) + layer_mlp)
        mlp += ran * layer_mlp
    result.update(mlp_flops_per_token=mlp, flops_per_token=flops)
    return result
