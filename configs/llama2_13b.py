"""AlpaCare recipe on LLaMA-2 13B, max length 1024, on a v5p-16 (8 chips).

    python -m alpacare_jax.train --config=configs/llama2_13b.py --workdir=DIR \
        --config.init_from_hf=PATH/Llama-2-13b-hf --config.data.data_dir=PATH/tfds
    python -m alpacare_jax.aot --config=configs/llama2_13b.py     # per-chip memory vs HBM

FSDP over the 8 chips; 16 rows of 1024 tokens per chip fit in one micro-batch with full remat.
A v5p-8 also fits it (`--config.tpu_topology=v5p-8`), at half the speed.
"""

from alpacare_jax.train.config import base_config


def get_config():
    c = base_config()
    # Model: LLaMA-2 13B; weights, architecture and tokenizer from the HF checkpoint (the preset must
    # match it: the AOT compile uses the preset). fp32 master weights, bf16 matmuls, splash attention,
    # every activation recomputed in the backward.
    c.model.preset = "llama2_13b"
    c.init_from_hf = "checkpoints/Llama-2-13b-hf"
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

    # Slice: FSDP over every chip; all 128 rows in one micro-batch (16 per chip).
    c.tpu_topology = "v5p-16"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.grad_accum_steps = 1
    return c
