"""Multiple-choice fine-tuning on HEAD-QA (English; 4 or 5 options), the contextual-prompting paper's recipe.

    # without context
    python -m alpacare_jax.train --config=configs/mcq_headqa.py --workdir=runs/headqa_seed0
    # with the contexts `data_gen contexts` wrote for each split
    python -m alpacare_jax.train --config=configs/mcq_headqa.py --workdir=runs/headqa_ctx_seed0 \
        --config.multiple_choice.train_contexts_file=data/headqa/train_contexts.jsonl \
        --config.multiple_choice.eval_contexts_file=data/headqa/dev_contexts.jsonl \
        --config.multiple_choice.test_contexts_file=data/headqa/test_contexts.jsonl
    # the paper's seeds: --config.seed=0|1|2; few-shot: --config.multiple_choice.train_size=100|200|500
    # with --config.multiple_choice.subset_seed=0|1|2 (the three random training subsets)
    # the paper's whole table (every run, without and with context): python -m alpacare_jax.eval.context_study

Each option is scored on (question, option + overall context + option context) by the LLaMA backbone
with a one-score head on the last token; softmax over the options (5 slots; a 4-option question leaves
one empty), cross-entropy. The dev accuracy
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

    # Data: HEAD-QA's released English JSON files (HEAD_EN); contexts off (set one CONTEXTS file per split
    # for "with context"). The test split is evaluated beside dev: the paper reports test accuracy of the
    # model selected on dev.
    c.multiple_choice.format = "headqa"
    c.multiple_choice.train_file = "data/headqa/train_HEAD_EN.json"
    c.multiple_choice.eval_file = "data/headqa/dev_HEAD_EN.json"
    c.multiple_choice.test_file = "data/headqa/test_HEAD_EN.json"
    c.multiple_choice.train_contexts_file = ""
    c.multiple_choice.eval_contexts_file = ""
    c.multiple_choice.test_contexts_file = ""
    c.multiple_choice.num_options = 5
    c.multiple_choice.train_size = 0  # every training question (few-shot: 100 / 200 / 500)
    c.multiple_choice.subset_seed = 0
    c.data.max_length = 512  # tokens per (question, option + contexts) row
    c.data.global_batch_size = 8  # questions per step

    # Recipe (the paper): AdamW, lr 5e-5, 200 warmup steps then linear decay, early stopping on dev
    # accuracy with a patience of 5 epochs (the epoch bound is rarely reached), seeds 0-2.
    c.seed = 0
    c.num_epochs = 30
    c.optimizer.learning_rate = 5e-5
    c.optimizer.warmup_steps = 200
    c.optimizer.schedule = "linear"
    c.optimizer.weight_decay = 0.0
    c.eval_every = -1  # once per epoch
    c.early_stopping_patience = 5

    # Parallelism: FSDP over every device, one micro-batch (8 questions x 5 options x 512 tokens).
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.grad_accum_steps = 1
    c.checkpoint_every = 500
    c.export_hf = True
    return c
