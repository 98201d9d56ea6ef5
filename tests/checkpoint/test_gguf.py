"""Streaming GGUF dequantization equals transformers' GGUF loader on the demo model, tensor for tensor."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from surgery.checkpoint.gguf_stream import stream_gguf
from surgery.checkpoint.sources import demo_gguf_path


@pytest.mark.slow
def test_streamed_demo_equals_transformers_loader(tmp_path):
    gguf = demo_gguf_path()
    shards = stream_gguf(gguf, tmp_path, max_shard_size=200 * 1024**2, progress=False)
    assert len(shards) > 1  # really sharded, with an index
    streamed = {}
    for shard in shards:
        streamed.update(load_file(tmp_path / shard))
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = reference.state_dict()
    state.pop("lm_head.weight")  # tied to the embeddings, stored once
    assert set(streamed) == set(state)
    for name, tensor in state.items():
        assert torch.equal(streamed[name], tensor), name
    from gguf import GGUFReader, dequantize

    raw = next(t for t in GGUFReader(gguf).tensors if t.name == "blk.3.attn_q.weight")
    as_stored = torch.from_numpy(dequantize(raw.data, raw.tensor_type).copy())
    q = streamed["model.layers.3.self_attn.q_proj.weight"]
    assert not torch.equal(q, as_stored) and torch.equal(q.sort(0).values, as_stored.sort(0).values)  # rows permuted
