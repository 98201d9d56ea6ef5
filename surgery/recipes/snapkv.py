"""SnapKV (Li et al., arXiv 2404.14469) as a baseline: the same token budget in every layer."""

from dataclasses import dataclass

from surgery.recipes.budget import TokenBudgetRecipe


@dataclass
class SnapKV(TokenBudgetRecipe):
    name = "snapkv"
    policy = "snapkv"
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., arXiv 2404.14469)"
    saves = "KV cache tokens: each layer keeps the observation window and the prefix tokens it attends to most"
