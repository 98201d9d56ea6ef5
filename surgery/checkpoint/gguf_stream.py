"""Dequantize a GGUF file tensor by tensor into safetensors shards, never holding the model.

The tensor names, and the Q/K permutation that llama-family GGUF files carry, are undone exactly as transformers'
GGUF loader does it: its own name map (`get_gguf_hf_weights_map`, built from a model on the meta device) and its
own tensor processors (`TENSOR_PROCESSORS`, which reverse the permutation). Only the loop differs: each tensor is
dequantized with the `gguf` package, processed, and written at once. `tests/checkpoint/test_gguf.py` checks the result
against transformers' loader, tensor for tensor.
"""

from collections import Counter
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from surgery.base.errors import SurgeryError
from surgery.base.sizes import DEFAULT_SHARD_SIZE
from surgery.checkpoint.families import read_model_type
from surgery.checkpoint.tensor_io import ShardWriter, check_finite

PROVENANCE_FILE = "gguf_source.json"


def gguf_provenance(gguf: Path) -> dict:
    """What a dequantized folder came from, for the card: the file, its quantization and its tensor types."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(gguf)
    field = reader.fields.get("general.file_type")
    try:
        quantization = LlamaFileType(int(field.parts[-1][0])).name.removeprefix("MOSTLY_") if field else "unknown"
    except ValueError:
        quantization = "unknown"
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return {"file": gguf.name, "quantization": quantization, "tensor_types": dict(sorted(types.items())),
            "dequantized_to": "float32"}


def write_provenance(gguf: Path, folder: Path) -> None:
    (folder / PROVENANCE_FILE).write_text(json.dumps(gguf_provenance(gguf), indent=2) + "\n")


def read_provenance(folder: Path) -> dict | None:
    path = Path(folder) / PROVENANCE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def stream_gguf(gguf: Path, out: Path, max_shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> list[str]:
    """Write `gguf` as float32 safetensors shards, config.json, tokenizer and generation config into `out`."""
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    if gguf.stat().st_size == 0:
        raise SurgeryError(f"the GGUF file {gguf} is empty", hint="re-download it")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)  # metadata only
    read_model_type(config.to_dict())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)  # names and shapes, no memory
    reader = GGUFReader(gguf)
    architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), encoding="utf-8")
    config_dict = config.to_dict()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    names = get_gguf_hf_weights_map(skeleton, processor)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)

    writer = ShardWriter(out, max_shard_size)
    written = []
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters={"config": config_dict})
        name = names.get(result.name)
        if name is None or name not in expected:
            continue
        weights = torch.from_numpy(np.array(result.weights)).to(torch.float32)
        if tuple(weights.shape) != expected[name]:
            raise SurgeryError(f"GGUF tensor {tensor.name} has shape {tuple(weights.shape)}, expected {expected[name]}")
        check_finite(name, weights)
        writer.add(name, weights)
        written.append(name)
    missing = sorted(set(expected) - set(written))
    if missing:
        raise SurgeryError(f"the GGUF file lacks {len(missing)} tensors, e.g. {missing[0]}", hint="re-download it")
    shards = writer.finish()

    config_dict.pop("quantization_config", None)
    config_dict.update(dtype="float32", architectures=[type(skeleton).__name__])
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    write_provenance(gguf, out)
    try:
        GenerationConfig.from_model_config(config).save_pretrained(out)
    except ValueError:
        pass
    return shards
