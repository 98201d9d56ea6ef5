"""The whole source model in the surgery architecture with the identity plan, for what needs every layer at once:
sampling self-generated calibration text, and the teacher-free paths of adapt and the benchmarks."""

import copy

import torch

from surgery.arch.configuration_surgery import SurgeryConfig
from surgery.arch.modeling_surgery import SurgeryForCausalLM
from surgery.checkpoint.export import expected_tensors
from surgery.checkpoint.sources import Source
from surgery.checkpoint.tensor_io import LazyCheckpoint, check_finite


def load_calibration_model(source: Source, config: SurgeryConfig) -> SurgeryForCausalLM:
    """The source weights in the surgery architecture with the identity plan, in float32 for calibration; read by
    surgery name (`LazyCheckpoint`), so families that store their experts under other names load too."""

    model = SurgeryForCausalLM(copy.deepcopy(config)).to(torch.float32)
    reader = LazyCheckpoint(source.folder)
    model.load_state_dict({name: reader.get(name) for name in expected_tensors(config)}, strict=False)
    model.tie_weights()
    for name, parameter in model.named_parameters():
        check_finite(name, parameter)
    return model.eval()
