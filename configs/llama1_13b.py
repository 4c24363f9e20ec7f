"""AlpaCare-13B as in the paper: LLaMA-1 13B, max length 1024, on a v4-32 (16 chips of 32 GiB).

    python -m alpacare_jax.train --config=configs/llama1_13b.py --workdir=DIR \
        --config.init_from_hf=PATH/llama-13b-hf --config.data.data_dir=PATH/tfds
    python -m alpacare_jax.aot --config=configs/llama1_13b.py     # per-chip memory vs HBM

FSDP over 16 chips: 9 GiB of fp32 weights + Adam moments per chip, and an 18 GiB peak with the step's
gradient buffers (two fp32 copies of each chip's shard), well inside 32 GiB. On a v4-16 the peak
exceeds HBM whatever the micro-batch; 4 micro-batches of 2 rows x 1024 tokens per chip.
"""

from alpacare_jax.train.config import tpu_recipe


def get_config():
    return tpu_recipe("llama1_13b", tpu_topology="v4-32", init_from_hf="checkpoints/llama-13b-hf",
                      max_length=1024, grad_accum_steps=4)
