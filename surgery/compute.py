"""The compute a model actually spent: tokens that entered each layer, counted by the routers (MoDification), and
the matmul FLOPs per token that follow from those counts. A dense layer counts every token."""

from __future__ import annotations

from typing import Any


def routers(model) -> dict[int, Any]:
    """{layer index: router} of a routed surgery model; empty for any other model."""
    layers = getattr(getattr(model, "model", None), "layers", [])
    return {i: layer.router for i, layer in enumerate(layers) if getattr(layer, "router", None) is not None}


def reset_counts(model) -> None:
    for router in routers(model).values():
        router.reset_counts()


def layer_matmul_flops(config) -> int:
    """Multiply-adds × 2 of one token through one decoder layer's projections and MLP (attention scores, which
    grow with the context, are not included)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * hidden * config.intermediate_size
    return 2 * (attention + mlp)


def measured_compute(model) -> dict[str, Any] | None:
    """Since the last `reset_counts`: the share of (token, routed layer) passes skipped, per routed layer and
    overall, and the projection and MLP FLOPs per token over all layers, from the tokens each layer actually ran
    (a batch whose rows route different counts runs padding too). None for a model without routers."""
    found = routers(model)
    if not found or not any(router.seen_tokens for router in found.values()):
        return None
    config = model.config
    skipped = {layer: 1 - router.routed_tokens / router.seen_tokens for layer, router in found.items()}
    # what the routed layers ran, per token seen: routed tokens plus the padding of batch rows that routed fewer
    computed = sum(router.computed_tokens / router.seen_tokens for router in found.values())
    passes = config.num_hidden_layers - len(found) + computed
    return {"tokens_skipped": sum(skipped.values()) / len(skipped),
            "skipped_per_layer": skipped,
            "flops_per_token": passes * layer_matmul_flops(config)}
