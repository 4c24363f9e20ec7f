"""CPU demo: a tiny LLaMA instruction-tuned on the bundled MedInstruct sample in a few minutes.

    python -m alpacare_jax.train --config=configs/demo.py --workdir=workdirs/demo

On first run it trains a small sentencepiece tokenizer on the sample and builds the TFDS dataset
(into WORKDIR/tokenizer and WORKDIR/tfds); then it trains, exports WORKDIR/hf and prints one answer.
Same code path as a TPU pod run: only the sizes differ.
"""

from alpacare_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.model.vocab_size = 1024
    c.model.hidden_size = 128
    c.model.intermediate_size = 344
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.max_position_embeddings = 256
    c.model.dtype = "float32"  # bf16 matmuls are slow on CPUs
    c.model.remat_policy = "none"

    c.bootstrap.source = "sample"
    c.bootstrap.tokenizer_vocab_size = 1024
    c.data.max_length = 256
    c.data.global_batch_size = 8

    # ~25 epochs of the 93-example training split: enough to (over)fit it, the point being a visible fall.
    c.num_train_steps = 300
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_ratio = 0.05
    c.optimizer.weight_decay = 0.0

    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 100
    c.keep_checkpoints = 2

    c.export_hf = True
    c.sample_prompt = "What are the common symptoms of iron deficiency anemia?"
    c.sample_max_new_tokens = 48
    return c
