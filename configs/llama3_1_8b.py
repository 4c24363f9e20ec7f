"""AlpaCare recipe on LLaMA-3.1 8B (GQA, 128k vocabulary, its own tokenizer), on a v5e-16 (16 chips).

    python -m alpacare_jax.train --config=configs/llama3_1_8b.py --workdir=DIR \
        --config.init_from_hf=PATH/Llama-3.1-8B --config.data.data_dir=PATH/tfds
    python -m alpacare_jax.aot --config=configs/llama3_1_8b.py    # per-chip memory vs HBM

The tokenizer (tokenizer.json) comes from the `init_from_hf` directory, like the weights. v5e chips have
16 GiB: FSDP over all 16 leaves ~7.5 GiB of weights, moments and gradients per chip, and 4
micro-batches keep the 128k-wide logits of each one small (a 12 GiB peak per chip).
"""

from alpacare_jax.train.config import tpu_recipe


def get_config():
    return tpu_recipe("llama3_1_8b", tpu_topology="v5e-16", init_from_hf="checkpoints/Llama-3.1-8B",
                      grad_accum_steps=4)
