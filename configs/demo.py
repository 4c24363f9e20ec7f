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
    c.model.max_position_embeddings = 512
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"  # bf16 matmuls are slow on CPUs
    c.model.remat_policy = "none"  # small enough to keep every activation

    c.bootstrap.source = "sample"
    c.bootstrap.tokenizer_vocab_size = 1024
    c.data.max_length = 512  # no sample example is cut (at 256, 57% were)
    c.data.global_batch_size = 8

    # ~19 epochs of the 93-example training split (8 steps each): the training loss falls from 6.97 to
    # about 2.2 while the validation loss stays near its minimum (about 4.5). Longer runs only memorise
    # the training split (300 steps at 2e-3: training loss 0.07, validation loss 5.6).
    c.num_train_steps = 150
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_ratio = 0.05
    c.optimizer.weight_decay = 0.0

    # Parallelism: FSDP over whatever devices there are (one CPU device by default), one micro-batch.
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.grad_accum_steps = 1

    c.log_every = 10
    c.eval_every = 25
    c.checkpoint_every = 50
    c.keep_checkpoints = 2

    c.export_hf = True
    c.sample_prompt = "What are the common symptoms of iron deficiency anemia?"
    c.sample_max_new_tokens = 48
    return c
