"""SnapKV (Li et al., arXiv 2404.14469): the same budget B in every layer. The baseline policy.

Shipped flat inside every checkpoint.
"""

from .budget_surgery import BudgetPolicy


class SnapKV(BudgetPolicy):
    name = "snapkv"
    default_window = 32
