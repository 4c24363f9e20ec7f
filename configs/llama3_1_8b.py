"""AlpaCare recipe on LLaMA-3.1 8B (GQA, 128k vocabulary, its own tokenizer), on a v5e-16 (16 chips).

    python -m alpacare_jax.train --config=configs/llama3_1_8b.py --workdir=DIR \
        --config.init_from_hf=PATH/Llama-3.1-8B --config.data.data_dir=PATH/tfds
    python -m alpacare_jax.aot --config=configs/llama3_1_8b.py    # per-chip memory vs HBM

The tokenizer (tokenizer.json) comes from the `init_from_hf` directory, like the weights. v5e chips have
16 GiB: FSDP over all 16 leaves ~7.5 GiB of weights, moments and gradients per chip.
"""

from alpacare_jax.train.config import base_config


def get_config():
    c = base_config()
    # Model: LLaMA-3.1 8B; weights, architecture and tokenizer from the HF checkpoint (the preset must
    # match it: the AOT compile uses the preset). fp32 master weights, bf16 matmuls, splash attention,
    # every activation recomputed in the backward.
    c.model.preset = "llama3_1_8b"
    c.init_from_hf = "checkpoints/Llama-3.1-8B"
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
    c.data.max_length = 512

    # Slice: FSDP over every chip; 4 micro-batches keep the 128k-wide logits of each one small.
    c.tpu_topology = "v5e-16"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.grad_accum_steps = 4
    return c
