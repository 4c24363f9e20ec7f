"""AlpaCare recipe with LoRA on LLaMA-2 70B, on a v5p-8 (4 chips).

    python -m alpacare_jax.train --config=configs/llama2_70b_lora.py --workdir=DIR \
        --config.init_from_hf=PATH/Llama-2-70b-hf --config.data.data_dir=PATH/tfds
    python -m alpacare_jax.aot --config=configs/llama2_70b_lora.py      # per-chip memory vs HBM
    python -m alpacare_jax.export_hf --workdir=DIR --out=ADAPTER_DIR --peft

33.8 GiB of bf16 base weights and adapter state per 95 GiB chip, a 53.7 GiB peak (BENCHMARKS.md): the
slice the 7B full fine-tuning uses. Full fine-tuning of 70B needs more than 1 TiB of weights, moments and
gradients (192.7 GiB of state per chip here): at least 12 v5p chips for those alone.
"""

from alpacare_jax.train.config import base_config


def get_config():
    c = base_config()
    # Model: LLaMA-2 70B, frozen in bf16 (half the bytes of the fp32 master weights full fine-tuning keeps);
    # the adapters train in fp32 with bf16 matmuls, splash attention, every activation recomputed.
    c.model.preset = "llama2_70b"
    c.init_from_hf = "checkpoints/Llama-2-70b-hf"
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "splash"
    c.model.remat_policy = "nothing_saveable"

    # LoRA on all seven projections (as QLoRA found best), rank 16, scale alpha / rank = 2.
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.lora.base_dtype = "bfloat16"

    # Recipe: AlpaCare's data, epochs, batch, schedule and length; the learning rate LoRA needs (adapters
    # start at zero and train ten times faster than whole models: 2e-4, the PEFT / QLoRA default).
    c.num_epochs = 3
    c.optimizer.learning_rate = 2e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.0
    c.data.global_batch_size = 128
    c.data.max_length = 512

    # Slice: FSDP over every chip; the 128 rows in 2 micro-batches.
    c.tpu_topology = "v5p-8"
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.grad_accum_steps = 2
    return c
