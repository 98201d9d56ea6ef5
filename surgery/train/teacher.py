"""The distillation teacher of `surgery adapt`, holding no second copy of the weights it shares with the student.

A converted checkpoint keeps most of its source's tensors unchanged; only what the recipes added, dropped or train
differs. The teacher is built in the surgery architecture with the identity plan (which computes exactly what the
family's transformers class computes, see tests/arch/test_identity_equals_family.py), tensor by tensor from the lazy checkpoint: a
tensor the student holds frozen with the same values is the student's own tensor, the same storage; only the rest
(the sharing layers' k_proj/v_proj, the tensors the student trains in place) is read into new memory. So adapt
holds the model once, plus what differs, the trainable parameters, their optimiser state and the activations.
"""

import copy
import logging

import torch
from torch import nn

from surgery.arch.modeling_surgery import SurgeryForCausalLM, SurgeryPositionEmbeddings
from surgery.checkpoint.families import surgery_config_from_source
from surgery.checkpoint.sources import Source
from surgery.checkpoint.tensor_io import LazyCheckpoint, check_finite

log = logging.getLogger(__name__)


def shared_teacher(source: Source, student: nn.Module, trained_in_place: set[str]) -> tuple[SurgeryForCausalLM, int]:
    """The teacher `source` as a frozen float32 model whose tensors equal to the student's frozen ones are the
    student's; returns it and the bytes it holds of its own."""
    config = surgery_config_from_source(source.config)
    config._attn_implementation = student.config._attn_implementation
    with torch.device("meta"):
        teacher = SurgeryForCausalLM(copy.deepcopy(config))
    reader = LazyCheckpoint(source.folder)
    student_tensors = dict(student.named_parameters())
    device = next(student.parameters()).device
    own_bytes = 0
    weights = {}
    for name, parameter in teacher.named_parameters():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensor = reader.get(name).to(device, torch.float32)
        check_finite(name, tensor)
        mine = student_tensors.get(name)
        if (mine is not None and name not in trained_in_place and mine.shape == tensor.shape
                and mine.dtype == tensor.dtype and torch.equal(mine, tensor)):
            weights[name] = mine  # the student's own storage
        else:
            weights[name] = nn.Parameter(tensor, requires_grad=False)
            own_bytes += tensor.numel() * tensor.element_size()
    for name, weight in weights.items():
        module_name, _, attribute = name.rpartition(".")
        setattr(teacher.get_submodule(module_name), attribute, weight)
    if config.tie_word_embeddings:
        teacher.lm_head.weight = teacher.model.embed_tokens.weight
    teacher.model.rotary_emb = SurgeryPositionEmbeddings(teacher.config).to(device)  # built on meta above
    log.info("teacher shares the student's storage except %.1f MiB", own_bytes / 2**20)
    return teacher.requires_grad_(False).eval(), own_bytes
