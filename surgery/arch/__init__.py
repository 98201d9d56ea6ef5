"""The remote-code model every converted checkpoint runs; `surgery.export` bundles these files flat."""

from .cache_surgery import SurgeryCache
from .configuration_surgery import SurgeryConfig
from .modeling_surgery import SurgeryForCausalLM, SurgeryModel

__all__ = ["SurgeryCache", "SurgeryConfig", "SurgeryForCausalLM", "SurgeryModel"]
