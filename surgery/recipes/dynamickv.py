"""DynamicKV (Zhou et al., arXiv 2412.14838): per-layer budgets from a global top-k over layers, updated every 4."""

from dataclasses import dataclass

from surgery.recipes.budget import TokenBudgetRecipe


@dataclass
class DynamicKV(TokenBudgetRecipe):
    name = "dynamickv"
    policy = "dynamickv"
    paper = "DynamicKV: Task-Aware Adaptive KV Cache Compression for Long Context LLMs (Zhou et al., arXiv 2412.14838)"
    saves = "KV cache tokens: per-layer budgets chosen during prefill by a global top-k of attention scores"
