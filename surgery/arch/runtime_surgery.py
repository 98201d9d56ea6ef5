"""The extension point of the surgery decoder: what a recipe's runtime module adds to a model built from a plan.

A recipe's runtime module (`pod_surgery.py`, `attention_gate_surgery.py`, ...) ends with `RUNTIME`, an instance of
a `Runtime` subclass that overrides only the hooks it needs: a cache store for some layers, modules on an attention
or decoder layer, how a prefill evicts. The decoder (`modeling_surgery.py`) names the runtime modules it may use in
one block; `surgery` writes that block per checkpoint (`checkpoint/export.runtime_block`), so a checkpoint ships, and a user who
audits it reads, only the modules its plan runs. The config says which those are (`SurgeryConfig.runtime_modules`).

Shipped flat inside every checkpoint: imports nothing.
"""

BLOCK_START = "# >>> runtime modules"
BLOCK_END = "# <<< runtime modules"


class Runtime:
    """One recipe's run-time hooks; every hook does nothing unless overridden."""

    module: str = ""  # its file is f"{module}_surgery.py"

    def used_by(self, config) -> bool:
        return self.module in config.runtime_modules()

    def cache_layer(self, config, layer_idx: int):
        """The store of a K/V-owning layer, when this recipe decides it (the first runtime that answers wins)."""
        return None

    def prepare_cache(self, cache, config) -> None:
        """Set whatever this recipe keeps on the cache as a whole (e.g. PoD's distant-view skip)."""

    def build_attention(self, attention, config) -> None:
        """Add this recipe's modules to a layer's attention (e.g. a gate, reduced-width bases)."""

    def build_layer(self, layer, config) -> None:
        """Add this recipe's modules to a decoder layer (e.g. a router)."""

    def prefill_policy(self, config, budget, budget_tokens, past_length, query_length, attention_mask, batch, device):
        """The eviction policy this forward runs when it is a prefill that must evict; None otherwise."""
        return None
