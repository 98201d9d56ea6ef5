"""PyramidKV (Cai et al., arXiv 2406.02069) as a baseline: budgets that fall linearly with depth (β = 20)."""

from dataclasses import dataclass

from surgery.recipes.budget import TokenBudgetRecipe


@dataclass
class PyramidKV(TokenBudgetRecipe):
    name = "pyramid"
    policy = "pyramid"
    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., arXiv 2406.02069)"
    saves = "KV cache tokens: more in lower layers, fewer in upper ones, the same total as SnapKV"
