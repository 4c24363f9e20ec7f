"""AlpaCare-7B as in the paper: LLaMA-1 7B fully fine-tuned on MedInstruct-52k, on a v5p-8 (4 chips).

    python -m alpacare_jax.train --config=configs/llama1_7b.py --workdir=DIR \
        --config.init_from_hf=PATH/llama-7b-hf --config.data.data_dir=PATH/tfds
    python -m alpacare_jax.aot --config=configs/llama1_7b.py      # per-chip memory vs HBM

FSDP over the 4 chips; 32 rows of 512 tokens per chip fit in one micro-batch with full remat
(a 34 GiB peak of each chip's 95 GiB).
"""

from alpacare_jax.train.config import tpu_recipe


def get_config():
    return tpu_recipe("llama1_7b", tpu_topology="v5p-8", init_from_hf="checkpoints/llama-7b-hf")
