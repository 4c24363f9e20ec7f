"""AlpaCare recipe on LLaMA-2 13B, max length 1024, on a v5p-16 (8 chips).

    python -m alpacare_jax.train --config=configs/llama2_13b.py --workdir=DIR \
        --config.init_from_hf=PATH/Llama-2-13b-hf --config.data.data_dir=PATH/tfds
    python -m alpacare_jax.aot --config=configs/llama2_13b.py     # per-chip memory vs HBM

FSDP over the 8 chips; 16 rows of 1024 tokens per chip fit in one micro-batch with full remat
(a 38 GiB peak of each chip's 95 GiB). A v5p-8 also fits it (74 GiB per chip), at half the speed.
"""

from alpacare_jax.train.config import tpu_recipe


def get_config():
    return tpu_recipe("llama2_13b", tpu_topology="v5p-16", init_from_hf="checkpoints/Llama-2-13b-hf",
                      max_length=1024)
