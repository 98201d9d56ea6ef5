"""SnapKV (Li et al., arXiv 2404.14469): the same budget B in every layer. The baseline policy.

Shipped flat inside the checkpoints that evict with it.
"""

from .budget_surgery import BudgetPolicy
from .policies_surgery import PolicyRuntime


class SnapKV(BudgetPolicy):
    name = "snapkv"
    default_window = 32


RUNTIME = PolicyRuntime(SnapKV)
