"""Multiple-choice fine-tuning on MedMCQA (4 options; a random 10k-question training subset, evaluated on
the dev split), the contextual-prompting paper's recipe.

    # without context
    python -m alpacare_jax.train --config=configs/mcq_medmcqa.py --workdir=runs/medmcqa_seed0
    # with the contexts `data_gen contexts` wrote for each split
    python -m alpacare_jax.train --config=configs/mcq_medmcqa.py --workdir=runs/medmcqa_ctx_seed0 \
        --config.multiple_choice.train_contexts_file=data/medmcqa/train_contexts.jsonl \
        --config.multiple_choice.eval_contexts_file=data/medmcqa/dev_contexts.jsonl
    # the paper's seeds: --config.seed=0|1|2; few-shot: --config.multiple_choice.train_size=100|200|500
    # with --config.multiple_choice.subset_seed=0|1|2 (the three random training subsets)
    # the paper's whole table (every run, without and with context): python -m alpacare_jax.eval.context_study

Each option is scored on (question, option + overall context + option context) by the LLaMA backbone
with a one-score head on the last token; softmax over the 4 options, cross-entropy. The dev accuracy
is measured every epoch and training stops after 5 epochs without a better one. The result exports as
a `LlamaForSequenceClassification` (num_labels=1) with `python -m alpacare_jax.export_hf`.
"""

from alpacare_jax.train.config import base_config


def get_config():
    c = base_config()
    c.objective = "multiple_choice"

    # Model: any HF LLaMA-family checkpoint (the backbone; the score head starts fresh). fp32 master
    # weights, bf16 matmuls, every activation recomputed in the backward.
    c.model.preset = "llama2_7b"
    c.init_from_hf = "checkpoints/Llama-2-7b-hf"
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "nothing_saveable"

    # Data: MedMCQA's released train.json / dev.json (one object per line); contexts off (set both files
    # for "with context"). Its test answers are not released: the paper reports dev accuracy.
    c.multiple_choice.format = "medmcqa"
    c.multiple_choice.train_file = "data/medmcqa/train.json"
    c.multiple_choice.eval_file = "data/medmcqa/dev.json"
    c.multiple_choice.test_file = ""
    c.multiple_choice.train_contexts_file = ""
    c.multiple_choice.eval_contexts_file = ""
    c.multiple_choice.test_contexts_file = ""
    c.multiple_choice.num_options = 4
    c.multiple_choice.train_size = 10_000  # the paper's random 10k subset (few-shot: 100 / 200 / 500)
    c.multiple_choice.subset_seed = 0
    c.data.max_length = 512  # tokens per (question, option + contexts) row
    c.data.global_batch_size = 8  # questions per step

    # Recipe (the paper): AdamW, lr 2e-5 for MedMCQA, 200 warmup steps then linear decay, early stopping
    # on dev accuracy with a patience of 5 epochs (the epoch bound is rarely reached), seeds 0-2.
    c.seed = 0
    c.num_epochs = 30
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_steps = 200
    c.optimizer.schedule = "linear"
    c.optimizer.weight_decay = 0.0
    c.eval_every = -1  # once per epoch
    c.early_stopping_patience = 5

    # Parallelism: FSDP over every device, one micro-batch (8 questions x 4 options x 512 tokens).
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.grad_accum_steps = 1
    c.checkpoint_every = 500
    c.export_hf = True
    return c
