"""The registry of KV budget policies, eviction at prefill, and context-only compression.

Adding a policy: one file with the policy class and `RUNTIME = PolicyRuntime(ThePolicy)`, which registers it here,
and one line in `surgery/recipes/__init__.py` for its converter. A checkpoint ships this module, `budget_surgery.py`
and its own policy's file only.

Shipped flat inside checkpoints that evict.
"""

import torch

from .budget_surgery import BudgetPolicy
from .cache_surgery import SurgeryCache
from .runtime_surgery import Runtime

POLICIES: dict[str, type[BudgetPolicy]] = {}  # by name, filled as each policy module builds its RUNTIME


class PolicyRuntime(Runtime):
    """A token-eviction policy's run-time side: registered under its name, it evicts after a prefill when the
    config names it, and serves `compress_context` for any policy registered."""

    def __init__(self, policy: type[BudgetPolicy]):
        self.policy = policy
        self.module = policy.name
        POLICIES[policy.name] = policy

    def used_by(self, config) -> bool:
        return config.kv_policy == self.policy.name

    def prefill_policy(self, config, budget, budget_tokens, past_length, query_length, attention_mask, batch, device):
        return policy_for_prefill(config, budget, budget_tokens, past_length, query_length, attention_mask, batch, device)

    def compress_context(self, model, *args, **kwargs):
        return compress_context(model, *args, **kwargs)


def build_policy(name: str, budget: float | None, budget_tokens: int | None, owners: list[int],
                 prompt_lengths: torch.Tensor, window: int | None = None, calibrated_weights: list[float] | None = None,
                 pooling: str = "avg", min_tokens: int = 0) -> BudgetPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown KV budget policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](budget, budget_tokens, owners, prompt_lengths, window, calibrated_weights, pooling, min_tokens)


def policy_for_prefill(config, budget, budget_tokens, past_length, query_length, attention_mask, batch, device):
    """The config's policy when this forward is a prefill that must evict: a budget below the whole prompt is set
    (by the call or by the config), and there is no earlier cache. None otherwise."""
    if budget is None and budget_tokens is None:
        budget, budget_tokens = config.kv_budget, config.kv_budget_tokens
    if config.kv_policy is None or past_length > 0 or query_length < 2:
        return None
    if budget_tokens is None and (budget is None or budget >= 1):
        return None
    if budget_tokens is not None and budget_tokens >= query_length:
        return None
    if budget_tokens is None and query_length <= (config.kv_min_tokens or 0):
        return None  # a short prompt stays whole
    if attention_mask is not None:
        lengths = attention_mask[:, :query_length].sum(-1)
    else:
        lengths = torch.full((batch,), query_length, device=device)
    return build_policy(config.kv_policy, budget, budget_tokens, config.full_attention_owners, lengths.cpu(), config.kv_window,
                        config.kv_layer_weights, config.kv_pooling, config.kv_min_tokens or 0)


@torch.no_grad()
def compress_context(model, input_ids: torch.LongTensor, kv_budget: float | None = None,
                     kv_budget_tokens: int | None = None, probe_ids: torch.LongTensor | None = None,
                     policy: str | None = None):
    """Prefill a context and evict down to the budget before any question is known (prefix caching, chat).

    Returns a cache that later `generate(context + question, past_key_values=cache)` calls continue from.
    `probe_ids` (batch 1): a generic question appended only to score the context, e.g. "What are the key facts
    and numbers above?"; its tokens are the observation window, then leave the cache again. Without a probe the
    last context tokens are the window, as in SnapKV.
    """
    config = model.config
    name = policy or config.kv_policy or "snapkv"
    if kv_budget is None and kv_budget_tokens is None:
        kv_budget, kv_budget_tokens = config.kv_budget, config.kv_budget_tokens
    tokens = kv_budget_tokens if kv_budget_tokens is not None else max(round(kv_budget * input_ids.shape[1]),
                                                                        config.kv_min_tokens or 0)
    ids, window = input_ids, config.kv_window
    if probe_ids is not None:
        ids = torch.cat([input_ids, probe_ids.to(input_ids.device)], dim=1)
        window = probe_ids.shape[1]
        tokens += window
    lengths = torch.full((ids.shape[0],), ids.shape[1])
    budget_policy = build_policy(name, None, tokens, config.full_attention_owners, lengths, window, config.kv_layer_weights,
                                 config.kv_pooling)
    cache = SurgeryCache.for_config(config, model.model.runtimes)
    cache.slack = 0 if probe_ids is None else probe_ids.shape[1]  # PoD windows keep room for the dropped probe
    cache = model(ids, past_key_values=cache, use_cache=True, kv_policy=budget_policy).past_key_values
    if probe_ids is not None:
        cache.drop_last(probe_ids.shape[1])
    cache.slack = 0
    return cache
