"""The AlpaCare recipe: full fine-tuning of LLaMA-7B on MedInstruct-52k.

    python -m alpacare_jax.train --config=configs/base.py --workdir=DIR \
        --config.init_from_hf=/path/to/llama-7b-hf --config.data.data_dir=/path/to/tfds

AlpaCare trained with the HF Trainer: 3 epochs, lr 2e-5, cosine schedule with 3% warmup, no weight
decay, global batch 128 (4 per device x 8 accumulation x 4 GPUs), max length 512, bf16, FSDP full
shard. Every other config starts from this one and changes what it must.

`model` names a preset (`alpacare_jax.model.PRESETS`, or `tiny`) and may override any `LlamaConfig`
field; with `init_from_hf` the architecture comes from the HF `config.json` instead and `model` may only
change non-architectural fields (dtype, remat_policy, attention_impl).
"""

from alpacare_jax.train.config import base_config


def get_config():
    return base_config()
