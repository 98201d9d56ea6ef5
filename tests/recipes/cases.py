"""How the conformance suite runs each registered recipe on a tiny model: the options that make it act at this
scale (a recipe not listed runs with its defaults), and the options at which it should change nothing."""

CALIBRATION = {"num_samples": 2, "seq_len": 32, "seed": 3}
BUDGET = {"keep": 0.3, "keep_at_least": 0, "window": 4}

OPTIONS: dict[str, dict] = {
    "kvsharer": {"share_layers": 1, "threshold": -1.0},
    "matryoshka": {"kv_fraction": 0.5, "search_samples": 2, "search_len": 16},
    "pod": {"sinks": 2, "recent": 8, "delta": 0.0, "last_queries": 8},
    "snapkv": BUDGET, "pyramid": BUDGET, "zigzag": BUDGET, "dynamickv": BUDGET, "streamingllm": BUDGET, "h2o": BUDGET,
    "lesa": {"target_layers": 6, "predictor_epochs": 1, "predictor_width": 16},
    "depth-up": {"target_layers": 6},
}
CALIBRATION_OVERRIDES = {"pod": {"seq_len": 1024}}  # PoD groups layers on samples of at least 1,024 tokens

# Options at which a recipe is the identity: the converted model gives the source's logits.
ZERO_STRENGTH: dict[str, dict] = {
    "none": {},
    "matryoshka": {"kv_fraction": 1.0, "search_samples": 2, "search_len": 16},
    "pod": {"delta": 2.0, "sinks": 2, "recent": 8, "last_queries": 8},  # delta above 1: no layer joins a group
    **{policy: {"keep": 1.0, "keep_at_least": 0} for policy in ("snapkv", "pyramid", "zigzag", "dynamickv",
                                                                "streamingllm", "h2o")},
    "attention-gate": {},  # gates start open
    "modification": {},  # routers start routing every token
    "depth-up": {"target_layers": 6, "method": "llama-pro"},  # new layers output zero
    "upcycle": {},  # exact copies of the MLP, renormalised top-k
    "adamoe": {"null_experts": 0, "top_k": 2},  # on a Qwen2-MoE source that renormalises its top-k  # and the source's top-k (the tiny MoE families pick 2)
}
