"""A decoder layer's MLP: the gated MLP of the dense families, or the mixture of experts every MoE family maps to
(Mixtral, Qwen2-MoE, Qwen3-MoE).

A router (`gate`, E logits per token) picks top-k experts from the softmax over all its logits; the chosen weights
are renormalised to sum to 1 where the family does (Mixtral always, the Qwen families with `norm_topk_prob`).
Each expert is a gated MLP of its own (`experts.{e}.gate_proj/up_proj/down_proj`, the layout the families save);
a token runs only through the experts it picked. Qwen2-MoE adds a shared expert scaled by σ(shared_expert_gate).

AdaMoE (Zeng et al., arXiv 2406.13233) adds m null experts as m more router rows: the top-k runs over all E + m
probabilities, a chosen null expert contributes nothing and costs nothing (no token is dispatched to it), and the
chosen true experts' weights are renormalised to sum 1, so a token uses between 0 and k true experts. With m = 0
this is plain top-k routing.

Shipped flat inside every converted checkpoint, so it imports only torch and the public API of transformers.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_surgery import SurgeryConfig


class SurgeryMLP(nn.Module):
    """One gated MLP, down(act(gate(x)) · up(x)): a dense layer's MLP, or one expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SurgeryMoE(nn.Module):
    """Top-k routing over E experts (and m null experts); counts the tokens each true expert ran, for measured
    FLOPs. In training it keeps this forward's routing (probabilities, chosen experts) for a load-balancing loss."""

    def __init__(self, config: SurgeryConfig):
        super().__init__()
        self.top_k = config.moe_top_k
        self.normalise = config.moe_norm_topk
        self.null_experts = config.adamoe_null_experts
        self.gate = nn.Linear(config.hidden_size, config.moe_experts + config.adamoe_null_experts, bias=False)
        self.experts = nn.ModuleList(SurgeryMLP(config.hidden_size, config.moe_intermediate_size, config.hidden_act)
                                     for _ in range(config.moe_experts))
        shared = config.moe_shared_intermediate_size
        self.shared_expert = SurgeryMLP(config.hidden_size, shared, config.hidden_act) if shared else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if shared else None
        self.dispatched = [0] * config.moe_experts  # tokens run per expert since the last reset (plain ints: no device)
        self.tokens = 0
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None  # training: (probabilities, chosen experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts), each (tokens, k): softmax over every logit in float32, then top-k; chosen null
        experts weigh 0, and the true experts' weights are renormalised where the family (or AdaMoE) does, a
        token that chose only null experts keeping weights 0."""
        probabilities = torch.softmax(self.gate(x).float(), dim=-1)
        if self.null_experts:
            # Null rows start as copies of the true rows, so each true expert ties with its copies; a stable sort
            # gives ties to the lower index, the true expert, where topk's order is implementation-defined.
            # Untrained, every token then runs the source's top-k true experts (the source model, exactly);
            # training moves the null rows away from the ties.
            weights, experts = torch.sort(probabilities, dim=-1, descending=True, stable=True)
            weights, experts = weights[:, : self.top_k], experts[:, : self.top_k]
            weights = weights.masked_fill(experts >= len(self.experts), 0.0)
        else:
            weights, experts = torch.topk(probabilities, self.top_k, dim=-1)
        if self.normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        if self.training:
            self.routing = (probabilities, experts)
        return weights, experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        counts = torch.bincount(experts.flatten(), minlength=self.gate.out_features)[: len(self.experts)].tolist()
        for expert in (e for e, count in enumerate(counts) if count):
            token, slot = torch.where(experts == expert)
            update = self.experts[expert](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, update.to(out.dtype))
        self.dispatched = [total + count for total, count in zip(self.dispatched, counts)]
        self.tokens += x.shape[0]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(hidden_states.shape)

    def reset_counts(self) -> None:
        self.dispatched = [0] * len(self.experts)
        self.tokens = 0


def layer_mlp(config: SurgeryConfig, layer_idx: int) -> nn.Module:
    """The MLP of decoder layer `layer_idx`: experts where the config says, else the dense gated MLP."""
    if config.moe_layers is not None and layer_idx in config.moe_layers:
        return SurgeryMoE(config)
    return SurgeryMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
