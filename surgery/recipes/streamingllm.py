"""StreamingLLM (Xiao et al., arXiv 2309.17453) as a baseline: attention sinks plus the most recent tokens, the
same number in every layer, chosen by position alone. The runtime is `arch/streamingllm_surgery.py`."""

from dataclasses import dataclass

from surgery.recipes.budget import TokenBudgetRecipe


@dataclass
class StreamingLLM(TokenBudgetRecipe):
    name = "streamingllm"
    policy = "streamingllm"
    paper = "Efficient Streaming Language Models with Attention Sinks (StreamingLLM; Xiao et al., arXiv 2309.17453)"
    saves = "KV cache tokens: each layer keeps the first 4 tokens (attention sinks) and the most recent ones"
