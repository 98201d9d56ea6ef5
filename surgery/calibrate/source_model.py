"""The whole source model in the surgery architecture with the identity plan, for what needs every layer at once:
sampling self-generated calibration text (`load_sampling_model`: the mapped shards themselves, in the source dtype,
no copy), and the teacher-free paths of adapt and the benchmarks (`load_calibration_model`: float32)."""

import copy

import torch

from surgery.arch.configuration_surgery import SurgeryConfig
from surgery.arch.modeling_surgery import SurgeryForCausalLM, SurgeryPositionEmbeddings
from surgery.checkpoint.export import expected_tensors
from surgery.checkpoint.sources import Source
from surgery.checkpoint.tensor_io import LazyCheckpoint, check_finite


def load_calibration_model(source: Source, config: SurgeryConfig) -> SurgeryForCausalLM:
    """The source weights in the surgery architecture with the identity plan, in float32 for calibration; read by
    surgery name (`LazyCheckpoint`), so families that store their experts under other names load too."""
    return _with_source_weights(SurgeryForCausalLM(copy.deepcopy(config)).to(torch.float32), source, config)


def load_sampling_model(source: Source, config: SurgeryConfig) -> SurgeryForCausalLM:
    """The source model over its memory-mapped safetensors shards, in the source dtype: its parameters are the
    shards' pages (file-backed, shared with the page cache), not a float32 copy, so sampling self-generated
    calibration text holds no more anonymous memory than the activations, at any model size. Tensors a layout
    must reassemble (fused experts) are the only copies. A float32 source samples exactly as a float32 copy would."""
    with torch.device("meta"):
        model = SurgeryForCausalLM(copy.deepcopy(config))
    model.model.rotary_emb = SurgeryPositionEmbeddings(model.config)  # float32 buffers, not weights: built, not read
    return _with_source_weights(model, source, config, assign=True)


def _with_source_weights(model: SurgeryForCausalLM, source: Source, config: SurgeryConfig,
                         assign: bool = False) -> SurgeryForCausalLM:
    """`model` holding the source's tensors: copied into its parameters, or (`assign`) the mapped tensors themselves;
    every weight checked finite."""
    reader = LazyCheckpoint(source.folder)
    model.load_state_dict({name: reader.get(name) for name in expected_tensors(config)}, strict=False, assign=assign)
    model.tie_weights()
    for name, parameter in model.named_parameters():
        check_finite(name, parameter)
    return model.eval()
