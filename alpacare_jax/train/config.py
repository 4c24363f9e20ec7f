"""Training configuration: the AlpaCare recipe as defaults, and turning a config into a `LlamaConfig`.

`base_config()` is the one place where every field is defined and documented. Config files under
`configs/` start from it and set, in full view, the values that make their recipe (big_vision style:
small Python files returning ConfigDicts; any field can be overridden with `--config.a.b=value`).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from etils import epath

from alpacare_jax.data import multiple_choice
from alpacare_jax.data.pipeline import default_data_config
from alpacare_jax.hf import CONFIG_FILE, config_from_hf, read_config
from alpacare_jax.model import LORA_TARGETS, LlamaConfig, LoraConfig
from alpacare_jax.train import loss


def base_config() -> ml_collections.ConfigDict:
    """Every training field with its documentation; the defaults are the AlpaCare recipe (configs/base.py)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # What is trained (alpacare_jax/train/objectives.py): "sft" (instruction tuning on `data`) or
    # "multiple_choice" (option scoring on `multiple_choice`, with `data` giving row length and batch).
    c.objective = "sft"

    # ---- model ----
    c.model = ml_collections.ConfigDict()
    c.model.preset = "llama1_7b"
    c.model.param_dtype = "float32"  # fp32 master weights ...
    c.model.dtype = "bfloat16"  # ... and bf16 matmuls
    c.model.remat_policy = "nothing_saveable"
    c.init_from_hf = ""  # HF LLaMA directory to start from (weights, architecture and tokenizer)
    c.tokenizer = ""  # tokenizer.model / tokenizer.json or a directory; "" = the one in init_from_hf

    # ---- LoRA (alpacare_jax/model/lora.py) ----
    # rank > 0 trains low-rank adapters only: the base weights (init_from_hf, or a random model drawn from
    # `seed` when there is none, for tests) are frozen, get no gradients and no optimizer state, and are
    # not saved in checkpoints (which name the base and its content checksums instead).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 16.0  # adapters are scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    c.lora.dropout = 0.0  # dropout on each adapter's input during training
    c.lora.rslora = False
    c.lora.targets = LORA_TARGETS  # projections with adapters: any of q, k, v, o, gate, up, down
    c.lora.base_dtype = "bfloat16"  # the frozen base weights' dtype (adapters keep model.param_dtype)
    c.lora.init_from_adapter = ""  # PEFT adapter directory to start the adapters from (rank etc. must match)

    # ---- data (alpacare_jax.data.pipeline) ----
    c.data = default_data_config()
    c.data.max_length = 512
    c.data.global_batch_size = 128
    # For the CPU demo: when set, a missing tokenizer is trained on this MedInstruct-format JSON ("sample"
    # = the bundled sample) and a missing TFDS dataset is built from it.
    c.bootstrap = ml_collections.ConfigDict()
    c.bootstrap.source = ""
    c.bootstrap.tokenizer_vocab_size = 1024
    c.bootstrap.validation_fraction = 0.15
    # Questions, options and contexts of the multiple-choice objective (alpacare_jax.data.multiple_choice);
    # `data.global_batch_size` then counts questions and `data.max_length` is the length of one option's row.
    c.multiple_choice = multiple_choice.default_config()

    # ---- optimisation ----
    c.num_epochs = 3  # used when num_train_steps is 0
    c.num_train_steps = 0  # 0 = num_epochs x steps per epoch
    c.grad_accum_steps = 1  # microbatches per step; the global batch is split, the loss stays a per-token mean
    # Positions per row projected onto the vocabulary at a time in the loss: bounds the logits memory
    # ([rows, chunk, vocab] float32 instead of [rows, length, vocab]) at no cost in speed.
    c.loss_chunk_size = loss.DEFAULT_CHUNK_SIZE
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 2e-5
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.warmup_steps = 0  # > 0: this many warmup steps instead of warmup_ratio of the run
    c.optimizer.schedule = "cosine"  # cosine | linear | constant (after warmup)
    c.optimizer.final_lr_fraction = 0.0  # cosine/linear end at learning_rate * this
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    # Regular expressions over '/'-joined parameter paths that never get weight decay (norms, embeddings).
    c.optimizer.no_decay = ("scale$", "embed_tokens")
    c.optimizer.max_grad_norm = 1.0

    # ---- parallelism (alpacare_jax.sharding) ----
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1))
    c.sharding_rules = ()  # () = alpacare_jax.sharding.DEFAULT_RULES; else [(logical_name, mesh_axes), ...]
    # The TPU slice this config is sized for (e.g. "v5p-8"); `python -m alpacare_jax.aot` compiles the
    # train step for it and checks that it fits in HBM. "" = not sized for a TPU (CPU/GPU configs).
    c.tpu_topology = ""

    # ---- bookkeeping ----
    c.log_every = 10
    c.eval_every = 200  # 0 = only at the end; -1 = once per epoch
    # Stop after this many evaluations in a row without a better selection metric (multiple choice:
    # eval_accuracy; SFT: eval_loss); 0 = never stop early. Survives restarts (rebuilt from metrics.jsonl).
    c.early_stopping_patience = 0
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True

    # ---- after training (process 0) ----
    c.export_hf = False  # write WORKDIR/hf (safetensors + tokenizer) at the end
    c.sample_prompt = ""  # print one greedy answer to this instruction at the end
    c.sample_max_new_tokens = 64

    # ---- lm-evaluation-harness tasks while training (alpacare_jax.eval.training) ----
    # A few small harness tasks scored with the live model every `every` steps and at the end, logged in
    # metrics.jsonl beside eval_loss as "<task>/<metric>". The harness sits above the trainer, so such a run
    # starts from `python -m alpacare_jax.eval train` (the training command's flags); the plain training
    # command refuses a config that names tasks rather than skip them.
    c.harness = ml_collections.ConfigDict()
    c.harness.tasks = ""  # comma-separated suite task names, e.g. "pubmedqa,mmlu_anatomy"; "" = none
    c.harness.every = 0  # 0 = only at the end
    c.harness.limit = 100  # documents per task (0 = all of them)
    c.harness.data_dir = ""  # local JSONL files in the benchmark suite's --data_dir layout; "" = the hub
    c.harness.batch_size = 16
    return c


HARNESS_HOOK = "harness"  # the name of the hook that scores `config.harness.tasks` (built in alpacare_jax.eval)


def harness_tasks(config: ml_collections.ConfigDict) -> list[str]:
    """The harness tasks a run scores while training (none when the config predates the field)."""
    harness = config.get("harness")
    return [t.strip() for t in (harness.tasks if harness else "").split(",") if t.strip()]


_NOT_MODEL_FIELDS = ("preset",)
_NON_ARCHITECTURAL = ("param_dtype", "dtype", "remat_policy", "attention_impl")


def llama_config(config: ml_collections.ConfigDict) -> LlamaConfig:
    """The model a training config describes: a preset (or an HF `config.json`) plus field overrides,
    with the LoRA adapters of `config.lora` when its rank is > 0."""
    return _base_llama_config(config).replace(lora=lora_config(config))


def lora_config(config: ml_collections.ConfigDict) -> LoraConfig | None:
    """The adapters `config.lora` asks for, or None for full fine-tuning."""
    if config.lora.rank == 0:
        return None
    if config.objective != "sft":
        raise ValueError(f"config.lora.rank={config.lora.rank}: LoRA trains the 'sft' objective only, "
                         f"not config.objective={config.objective!r}")
    try:
        return LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                          rslora=config.lora.rslora, targets=tuple(config.lora.targets))
    except ValueError as e:
        raise ValueError(f"config.lora: {e}") from None


def _base_llama_config(config: ml_collections.ConfigDict) -> LlamaConfig:
    fields = {k: v for k, v in config.model.items() if k not in _NOT_MODEL_FIELDS}
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model has unknown fields {unknown}; LlamaConfig fields are {sorted(known)}")
    if config.init_from_hf:
        hf_file = epath.Path(config.init_from_hf) / CONFIG_FILE
        if not hf_file.exists():
            raise FileNotFoundError(f"config.init_from_hf={config.init_from_hf!r}: no {CONFIG_FILE} there")
        base = config_from_hf(read_config(hf_file), str(hf_file))
        architectural = sorted(k for k, v in fields.items() if k not in _NON_ARCHITECTURAL and v != getattr(base, k))
        if architectural:
            raise ValueError(f"with init_from_hf the architecture comes from {hf_file}; "
                             f"config.model may not change {architectural}")
        return base.replace(**{k: v for k, v in fields.items() if k in _NON_ARCHITECTURAL})
    if config.model.preset == "tiny":
        return LlamaConfig.tiny(**fields)
    return LlamaConfig.preset(config.model.preset, **fields)
