"""The eval commands: perplexity and agreement, pass key, RULER-style retrieval, lm-eval, compare."""
