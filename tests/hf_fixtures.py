"""Random tiny `transformers` LLaMA models: the outside reference every conversion test compares to."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Shapes that exercise each difference between LLaMA generations.
HF_SHAPES = {
    "multi_head": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_2kv": dict(num_attention_heads=4, num_key_value_heads=2),
    "llama31_rope_scaling": dict(
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
    "tied_embeddings": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
}


def make_hf_model(shape: str, seed: int = 0, vocab_size: int = 128):
    import torch
    import transformers

    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-5,
                 max_position_embeddings=256)
    config = transformers.LlamaConfig(**{**sizes, **HF_SHAPES[shape]})
    model = transformers.LlamaForCausalLM(config).eval()
    # Default init leaves norms at 1; random norm scales make the parity test sensitive to them too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(input_ids, dtype=torch.long)).logits.float().numpy()


def random_ids(vocab: int, batch: int = 2, length: int = 19, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


def save_hf(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path
