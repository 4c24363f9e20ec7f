"""The AlpaCare recipe: full fine-tuning of LLaMA-7B on MedInstruct-52k (any hardware).

    python -m alpacare_jax.train --config=configs/base.py --workdir=DIR \
        --config.init_from_hf=/path/to/llama-7b-hf --config.data.data_dir=/path/to/tfds

AlpaCare trained with the HF Trainer: 3 epochs, lr 2e-5, cosine schedule with 3% warmup, no weight
decay, global batch 128 (4 per device x 8 accumulation x 4 GPUs), max length 512, bf16, FSDP full
shard. The values below are that recipe; what each field means is documented once, in
`alpacare_jax/train/config.py`.

`model.preset` names a preset (`alpacare_jax.model.PRESETS`, or `tiny`) and may override any
`LlamaConfig` field; with `init_from_hf` the architecture comes from the HF `config.json` instead and
`model` may only change non-architectural fields (dtype, remat_policy, attention_impl).
"""

from alpacare_jax.train.config import base_config


def get_config():
    c = base_config()
    # Model: LLaMA-1 7B, fp32 master weights and bf16 matmuls, activations recomputed in the backward.
    c.model.preset = "llama1_7b"
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "nothing_saveable"

    # Recipe (AlpaCare, HF Trainer).
    c.num_epochs = 3
    c.optimizer.learning_rate = 2e-5
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.weight_decay = 0.0
    c.data.global_batch_size = 128
    c.data.max_length = 512

    # Parallelism: FSDP over every device, the whole batch in one micro-batch.
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.grad_accum_steps = 1
    return c
