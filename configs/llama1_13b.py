"""AlpaCare-13B as in the paper: LLaMA-1 13B, max length 1024, on a v4-32 (16 chips of 32 GiB).

    python -m alpacare_jax.train --config=configs/llama1_13b.py --workdir=DIR \
        --config.init_from_hf=PATH/llama-13b-hf --config.data.data_dir=PATH/tfds
    python -m alpacare_jax.aot --config=configs/llama1_13b.py     # per-chip memory vs HBM

FSDP over 16 chips: 9 GiB of fp32 weights + Adam moments per chip, plus the step's gradient buffers
(two fp32 copies of each chip's shard), well inside 32 GiB. On a v4-16 the peak exceeds HBM whatever the
micro-batch size.
"""

from alpacare_jax.train.config import base_config


def get_config():
    c = base_config()
    # Model: LLaMA-1 13B; weights, architecture and tokenizer from the HF checkpoint (the preset must
    # match it: the AOT compile uses the preset). fp32 master weights, bf16 matmuls, splash attention,
    # every activation recomputed in the backward.
    c.model.preset = "llama1_13b"
    c.init_from_hf = "checkpoints/llama-13b-hf"
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "splash"
    c.model.remat_policy = "nothing_saveable"

    # Recipe (AlpaCare, HF Trainer).
    c.num_epochs = 3
    c.optimizer.learning_rate = 2e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.0
    c.data.global_batch_size = 128
    c.data.max_length = 1024

    # Slice: FSDP over every chip; 4 micro-batches of 2 rows x 1024 tokens per chip keep the activations small.
    c.tpu_topology = "v4-32"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.grad_accum_steps = 4
    return c
