"""Tiny GGUF files of the families transformers can read from GGUF, written with gguf's own writer, so the GGUF
path is tested offline on each family and not only on the demo model: llama.cpp's tensor names (transformers' map
read backwards), Gemma's norms stored as 1 + w as llama.cpp stores them, the architecture's metadata keys, and a
small sentencepiece vocabulary."""

from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

GGUF_ARCHITECTURE = {"gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def write_tiny_gguf(folder: Path, path: Path) -> Path:
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    architecture = GGUF_ARCHITECTURE[config.model_type]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = {hf: name for name, hf in get_gguf_hf_weights_map(model, processor).items()}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"\u2581t{i}" for i in range(4, config.vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 4 + [-float(i) for i in range(4, config.vocab_size)])
    writer.add_token_types([3, 3, 3, 2] + [1] * (config.vocab_size - 4))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(3)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stored = tensor + 1 if architecture != "phi3" and "norm.weight" in name else tensor
        writer.add_tensor(names.get(name, "output.weight"), np.ascontiguousarray(stored.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
