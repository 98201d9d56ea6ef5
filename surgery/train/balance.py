"""The load-balancing loss that trains mixtures of experts (sparse upcycling, AdaMoE), from the routing each block
kept in its last training forward.

Per MoE layer, over T tokens and R = E + m router rows (m null experts, AdaMoE):

    L = R · Σ_i f̃_i · P_i,   f_i = (1/T) · #(tokens that chose i among their top-k),   P_i = (1/T) · Σ_t p_t,i

with f̃_i = f_i for a true expert and, for a null expert, the mean of f over the null experts (AdaMoE, Zeng et al.,
arXiv 2406.13233, §3). Averaging the null experts' counts lets the router put any share of a token's k choices on
null experts without a penalty for which null it picked, so tokens can use a varying number of true experts. With
m = 0 it is the Switch Transformer / Mixtral loss. f is a count (no gradient); P carries the gradient.

Deviation, documented: the official AdaMoE code for Mixtral means to average the null experts' counts, but the line
that does it has no effect, so its loss is the plain one over E + m experts. This is the loss the paper describes.
transformers pools all layers' tokens into one loss; this averages the per-layer losses, so each layer is balanced
on its own tokens.
"""

from __future__ import annotations

import torch

from surgery.metrics.compute import expert_blocks


def load_balancing_loss(probabilities: torch.Tensor, chosen: torch.Tensor, true_experts: int) -> torch.Tensor:
    """L of one layer: `probabilities` (T, E + m) from the softmax over every router row, `chosen` (T, k) the rows
    each token picked; rows from `true_experts` on are null experts."""
    tokens, rows = probabilities.shape
    counts = torch.bincount(chosen.flatten(), minlength=rows).to(probabilities.dtype) / tokens
    if rows > true_experts:
        counts = torch.cat([counts[:true_experts], counts[true_experts:].mean().expand(rows - true_experts)])
    return rows * (counts * probabilities.mean(dim=0)).sum()


def balance_loss(model) -> torch.Tensor | None:
    """The mean of L over the MoE layers that routed in this training forward (their routing then forgotten);
    None when none did."""
    losses = []
    for block in expert_blocks(model).values():
        if block.routing is not None:
            probabilities, chosen = block.routing
            losses.append(load_balancing_loss(probabilities, chosen, len(block.experts)))
            block.routing = None
    return torch.stack(losses).mean() if losses else None
