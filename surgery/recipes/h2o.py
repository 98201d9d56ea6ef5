"""H2O (Zhang et al., arXiv 2306.14048) as a baseline: recent tokens plus the heavy hitters of the attention
accumulated over the whole prompt, half of the budget each. The runtime is `arch/h2o_surgery.py`."""

from dataclasses import dataclass

from surgery.recipes.budget import TokenBudgetRecipe


@dataclass
class H2O(TokenBudgetRecipe):
    name = "h2o"
    policy = "h2o"
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models (Zhang et al., arXiv 2306.14048)"
    saves = "KV cache tokens: each layer keeps the recent half of its budget and the tokens with the most accumulated attention"
