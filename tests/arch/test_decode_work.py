"""A decode step after eviction costs what the cache holds, not what the prompt was: counted in tensor elements that
operations read and write (views excluded), never in seconds. Two prompts of different lengths evicted to the same budget
must cost a decode step the same work, for every token-budget policy, with the padding mask generate() passes."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from factories import tiny_surgery_model
from surgery.arch.policies_surgery import POLICIES

VIEWS = {"aten.slice.Tensor", "aten.view.default", "aten.expand.default", "aten.select.int", "aten.unsqueeze.default",
         "aten.t.default", "aten.transpose.int", "aten.as_strided.default", "aten.alias.default", "aten.detach.default",
         "aten._unsafe_view.default", "aten.permute.default", "aten.squeeze.dim", "aten.split.Tensor"}


class ElementsRead(TorchDispatchMode):
    """Sums the elements of every tensor each operation reads or writes, leaving out operations that only make
    views."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if str(func) not in VIEWS:
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            self.elements += sum(t.numel() for t in (*args, *outputs) if isinstance(t, torch.Tensor))
        return out


def decode_step_work(policy: str, prompt: int, kept: int) -> int:
    model = tiny_surgery_model(seed=0, kv_policy=policy, kv_window=4)
    ids = torch.randint(3, 97, (1, prompt + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cache = model(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True,
                      kv_budget_tokens=kept).past_key_values
        assert cache.layers[0].valid.shape[-1] <= 2 * kept  # the prompt really was evicted
        with ElementsRead() as work:
            model(ids[:, prompt:], attention_mask=mask, past_key_values=cache, use_cache=True)
    return work.elements


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_decode_step_after_eviction_does_not_grow_with_the_evicted_prompt(policy):
    short, long = decode_step_work(policy, 200, 32), decode_step_work(policy, 600, 32)
    assert long - short <= 2 * (600 - 200)  # the padding mask generate() passes is one O(prompt) read; nothing else


def gated_decode_work(prompt: int, **gate) -> int:
    model = tiny_surgery_model(seed=0, **gate)
    ids = torch.randint(3, 97, (1, prompt + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids[:, :prompt], use_cache=True).past_key_values
        with ElementsRead() as work:
            model(ids[:, prompt:], past_key_values=cache, use_cache=True)
    return work.elements


def test_a_gated_decode_step_reads_its_heads_in_place():
    """An Attention-Gate keeps a different count per KV head; a decode step attends head by head over the kept
    tensors as they are. Per prompt token, it touches what an ungated step touches plus the gate's own prefix
    attention and its bookkeeping, never a padded, stacked copy of the layer (which made it 2.6× an ungated step)."""
    gate = {"attention_gate_heads": 1, "attention_gate_width": 4, "attention_gate_threshold": 0.5}
    per_token = (gated_decode_work(600, **gate) - gated_decode_work(200, **gate)) / 400
    plain = (gated_decode_work(600) - gated_decode_work(200)) / 400
    assert per_token <= 1.3 * plain
