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


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_family_gguf_streams_like_transformers_and_converts_to_the_identity(family, tmp_path, monkeypatch):
    """A GGUF of each family (Gemma's norms stored as 1 + w, Phi-3's fused projections): the streamed shards equal
    transformers' GGUF loader tensor for tensor, and `surgery inspect` and `convert` read the file, giving the
    logits transformers gives for it."""
    from factories import save_tiny
    from gguf_files import write_tiny_gguf
    from helpers import cli, load_remote, run_convert

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    source = save_tiny(tmp_path / "source", family, tie_word_embeddings=family != "phi3")
    (tmp_path / "files").mkdir()
    (tmp_path / "streamed").mkdir()
    gguf = write_tiny_gguf(source, tmp_path / "files" / f"{family}.gguf")
    stream_gguf(gguf, tmp_path / "streamed", progress=False)
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    state = reference.state_dict()
    if reference.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert set(streamed) == set(state)
    assert all(torch.equal(streamed[name], tensor) for name, tensor in state.items())
    original = load_file(source / "model.safetensors")
    norm = next(name for name in original if name.endswith("input_layernorm.weight"))
    assert torch.allclose(streamed[norm], original[norm], atol=1e-6)  # 1 + w read back as w

    result = cli("inspect", gguf)
    assert result.exit_code == 0 and family.split("_")[0] in result.output, result.output
    out = run_convert(gguf, tmp_path / "out", recipe="none")
    ids = torch.randint(3, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (load_remote(out)(ids).logits - reference(ids).logits).abs().max() < 1e-5
