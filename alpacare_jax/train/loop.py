"""The training loop: set up (tokenizer, data, mesh, state), then step, log, evaluate, checkpoint.

    train(config, workdir)

Everything a later process needs to rebuild the model is written to the workdir before the first
step: `config.json` (the resolved training config), `model_config.json` (the `LlamaConfig`) and
`tokenizer/`. Restarting with the same workdir resumes from the newest good checkpoint. SIGTERM (how
TPU VMs announce preemption) makes the loop checkpoint the current step and return normally.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from alpacare_jax import sharding as sharding_lib
from alpacare_jax.data import pipeline
from alpacare_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from alpacare_jax.model import LlamaConfig
from alpacare_jax.train import objectives
from alpacare_jax.train import state as state_lib
from alpacare_jax.train import step as step_lib
from alpacare_jax.train.checkpoint import Checkpointer
from alpacare_jax.train.config import llama_config
from alpacare_jax.train.early_stopping import EarlyStopping
from alpacare_jax.train.metrics import MetricsWriter, Throughput, read_metrics

log = logging.getLogger(__name__)

SAMPLE_JSON = Path(pipeline.__file__).parent / "sample" / "medinstruct_sample.json"
TOKENIZER_DIR = "tokenizer"
MODEL_CONFIG_FILE = "model_config.json"


# ---- setup ----------------------------------------------------------------------------------------------

def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _bootstrap_source(config: ml_collections.ConfigDict) -> Path | None:
    source = config.bootstrap.source
    if not source:
        return None
    path = SAMPLE_JSON if source == "sample" else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"config.bootstrap.source={source!r}: no such file")
    return path


def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: epath.Path) -> Tokenizer:
    """The run's tokenizer, also saved as WORKDIR/tokenizer (the workdir alone must rebuild the model).

    Order: `config.tokenizer`, the `init_from_hf` directory, WORKDIR/tokenizer from an earlier run, or
    (demo) a new one trained on `config.bootstrap.source`.
    """
    own = workdir / TOKENIZER_DIR
    if config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    elif config.init_from_hf:
        tokenizer = load_tokenizer(config.init_from_hf)
    elif own.exists():
        return load_tokenizer(own)
    elif (source := _bootstrap_source(config)) is not None:
        if _is_primary():
            log.info("training a %d-piece tokenizer on %s", config.bootstrap.tokenizer_vocab_size, source)
            train_tokenizer(source, own, vocab_size=config.bootstrap.tokenizer_vocab_size)
        _sync("tokenizer trained")
        return load_tokenizer(own)
    else:
        raise ValueError("no tokenizer: set config.tokenizer, config.init_from_hf or config.bootstrap.source")
    if _is_primary():
        tokenizer.save(own)
    return tokenizer


def prepare_data(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    """The data config to read; with `bootstrap.source`, builds the TFDS dataset first if it is absent."""
    data_config = config.data.copy_and_resolve_references()
    source = _bootstrap_source(config)
    if source is None:
        return data_config
    if not data_config.data_dir:
        data_config.data_dir = str(workdir / "tfds")
    try:
        pipeline.num_examples(data_config)
    except FileNotFoundError:
        if _is_primary():
            from alpacare_jax.data.build import build_dataset

            name = data_config.dataset.split("/")[-1]
            log.info("building TFDS %s from %s into %s", data_config.dataset, source, data_config.data_dir)
            build_dataset(name, source, data_config.data_dir,
                          validation_fraction=config.bootstrap.validation_fraction)
        _sync("dataset built")
    return data_config


def total_train_steps(config: ml_collections.ConfigDict, data_config, tokenizer: Tokenizer) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    if config.num_epochs <= 0:
        raise ValueError("set config.num_train_steps or config.num_epochs (both are 0)")
    per_epoch = objectives.from_config(config).steps_per_epoch(config, data_config, tokenizer)
    if per_epoch == 0:
        raise ValueError(f"the training split has less than one global batch ({data_config.global_batch_size} rows)")
    return config.num_epochs * per_epoch


def save_run_description(workdir: epath.Path, config: ml_collections.ConfigDict, model_config: LlamaConfig) -> None:
    if not _is_primary():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    (workdir / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_config), indent=2) + "\n")


def load_model_config(workdir: str | epath.Path) -> LlamaConfig:
    """The `LlamaConfig` a training run in `workdir` used."""
    path = epath.Path(workdir) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    return LlamaConfig(**json.loads(path.read_text()))


def _validate(config: ml_collections.ConfigDict, model_config: LlamaConfig, tokenizer: Tokenizer) -> None:
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model_config.vocab_size} embeddings (config.model.vocab_size)")
    if config.data.max_length > model_config.max_position_embeddings:
        raise ValueError(f"data.max_length={config.data.max_length} exceeds the model's "
                         f"max_position_embeddings={model_config.max_position_embeddings}")
    if config.data.global_batch_size % config.grad_accum_steps:
        raise ValueError(f"data.global_batch_size={config.data.global_batch_size} is not divisible by "
                         f"grad_accum_steps={config.grad_accum_steps}")
    for key in ("log_every", "grad_accum_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")


# ---- preemption -----------------------------------------------------------------------------------------

class PreemptionFlag:
    """Set by SIGTERM; every process must agree to stop at the same step, so the flag is all-reduced."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def should_stop(self, checkpointer: Checkpointer, step: int) -> bool:
        stop = self.received
        if jax.process_count() > 1:
            stop = bool(multihost_utils.process_allgather(np.int32(stop)).max())
        # On TPU pods jax's preemption notice reaches every host; orbax asks it for the agreed step.
        return stop or checkpointer.manager.reached_preemption(step)

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


# ---- the loop -------------------------------------------------------------------------------------------

def evaluate(objective, eval_step, params, batches, mesh, batch_spec) -> dict[str, float]:
    """The objective's metrics over the whole validation split (`eval_loss`, ...; empty when it is empty)."""
    sums: dict[str, float] = {}
    for local in batches:
        for key, value in eval_step(params, pipeline.to_global_batch(local, mesh, batch_spec)).items():
            sums[key] = sums.get(key, 0.0) + float(value)
    return objective.eval_metrics(sums) if sums else {}


def train(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    workdir = epath.Path(workdir)
    model_config = llama_config(config)
    tokenizer = prepare_tokenizer(config, workdir)
    _validate(config, model_config, tokenizer)
    data_config = prepare_data(config, workdir)
    total_steps = total_train_steps(config, data_config, tokenizer)
    save_run_description(workdir, config, model_config)

    program = step_lib.build_train_program(config, model_config, total_steps)
    setup, tx, train_step, objective = program.setup, program.tx, program.train_step, program.objective
    mesh, rules = setup.mesh, setup.rules
    eval_step = step_lib.jit_eval_step(setup, objective)
    train_iter = objective.train_iterator(config, data_config, tokenizer)
    checkpointer = Checkpointer(workdir / "checkpoints", save_every=config.checkpoint_every,
                                keep=config.keep_checkpoints, async_save=config.async_checkpointing)

    try:
        state = checkpointer.restore_latest(setup.abstract_state, train_iter)
    except BaseException:
        checkpointer.close()  # stops orbax's background threads, which otherwise fail noisily at exit
        raise
    if state is None:
        params = None
        if config.init_from_hf:
            from alpacare_jax.hf import load_pretrained

            model = load_pretrained(config.init_from_hf, dtype=model_config.param_dtype,
                                    compute_dtype=model_config.dtype, mesh=mesh, rules=rules,
                                    remat_policy=model_config.remat_policy,
                                    attention_impl=model_config.attention_impl)
            params = nnx.to_pure_dict(nnx.state(model))
            if objective.name == "multiple_choice":
                params = objectives.initial_params_from_causal_lm(params, model_config, config.seed)
        state = state_lib.init_train_state(setup, model_config, tx, config.seed, params)
        start_step = 0
    else:
        start_step = int(state.step)
        log.info("resumed from the checkpoint at step %d", start_step)
        if _is_primary():
            print(f"resumed from step {start_step}", flush=True)

    writer = MetricsWriter(workdir, enabled=_is_primary(), resume_step=start_step)
    tokens_per_step = objectives.tokens_per_step(config)
    throughput = Throughput(model_config.flops_per_token(data_config.max_length), tokens_per_step, mesh.size)
    preemption = PreemptionFlag()
    batch_spec = sharding_lib.logical_to_spec(objective.batch_axes, rules)
    eval_every = config.eval_every
    if eval_every < 0:  # once per epoch
        eval_every = objective.steps_per_epoch(config, data_config, tokenizer)
    metric, higher_is_better = objective.selection_metric
    stopper = EarlyStopping(metric, higher_is_better, config.early_stopping_patience)
    if _is_primary() and start_step:
        stopper.replay(read_metrics(workdir))  # the history up to the checkpoint (the writer dropped the rest)
    progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not _is_primary())
    last: dict = {}
    step = start_step
    stopped_early = False
    try:
        # A restarted run that had already stopped early (its checkpoint is that step) trains no further.
        while step < total_steps and not (stopped_early := _agree(stopper.should_stop)):
            batch = pipeline.to_global_batch(next(train_iter), mesh, batch_spec)
            state, metrics = train_step(state, batch)
            step += 1
            throughput.step()
            progress.update()
            do_eval = (eval_every and step % eval_every == 0) or step == total_steps
            if do_eval or step % config.log_every == 0 or step == start_step + 1:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(throughput.report())
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss is {last['loss']} at step {step}")
                progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}")
                if do_eval:
                    eval_start = time.perf_counter()
                    eval_batches = objective.eval_iterator(config, data_config, tokenizer)
                    last.update(evaluate(objective, eval_step, state.params, eval_batches, mesh, batch_spec))
                    stopper.observe(step, last)
                    throughput.exclude(time.perf_counter() - eval_start)
                writer.write(step, last)
            stop = preemption.should_stop(checkpointer, step)
            stopped_early = _agree(stopper.should_stop)
            if checkpointer.should_save(step) or step == total_steps or stop or stopped_early:
                checkpointer.save(state, train_iter, step=step)
            if stop:
                log.warning("preemption signal: checkpointed step %d, exiting", step)
                if _is_primary():
                    print(f"preempted: saved a checkpoint at step {step}", flush=True)
                break
            if stopped_early:
                break
    finally:
        progress.close()
        preemption.restore()
        checkpointer.close()  # waits for the last async save
        writer.close()

    if stopped_early and _is_primary():
        print(f"early stopping at step {step}: best {stopper.metric} {stopper.best:.4f} at step "
              f"{stopper.best_step}, none better in the {stopper.since_best} evaluations since", flush=True)
    if (step == total_steps or stopped_early) and not preemption.received:
        _after_training(config, workdir, setup, state, tokenizer)
    return last


def _agree(flag: bool) -> bool:
    """Process 0's decision (only it reads the metrics history), the same on every process."""
    if jax.process_count() > 1:
        return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
    return flag


def _after_training(config, workdir, setup, state, tokenizer) -> None:
    """The demo's finish: HF export and one greedy answer (all processes take part in the gathers)."""
    if config.export_hf:
        from alpacare_jax.hf import save_pretrained

        out = workdir / "hf"
        save_pretrained(nnx.merge(setup.graphdef, state.params), out, dtype="float32", tokenizer=tokenizer)
        if _is_primary():
            print(f"exported the model for transformers to {out}", flush=True)
    if config.sample_prompt and config.objective == "sft":
        from alpacare_jax.infer.completion import answer as answer_instruction
        from alpacare_jax.model import SamplingConfig

        answer = answer_instruction(nnx.merge(setup.graphdef, state.params), tokenizer, config.sample_prompt,
                                    sampling=SamplingConfig(max_new_tokens=config.sample_max_new_tokens))
        if _is_primary():
            print(f"\n### Instruction:\n{config.sample_prompt}\n\n### Response:\n{answer}\n", flush=True)
