"""The training loop, in the order it runs: setup, then step, log, hooks (evaluation, ...), checkpoint.

    train(config, workdir)

Before the first step the workdir (alpacare_jax/workdir.py) receives everything a later process needs
to rebuild the model: the resolved config, the model config and the tokenizer. Restarting with the same
workdir resumes from the newest good checkpoint with the batches an uninterrupted run would have seen.
SIGTERM (how TPU VMs announce preemption) makes the loop checkpoint the current step and return.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from alpacare_jax import hf, hf_peft
from alpacare_jax import sharding as sharding_lib
from alpacare_jax.data import bootstrap, pipeline
from alpacare_jax.data.tokenizer import Tokenizer, load_tokenizer
from alpacare_jax.model import LlamaConfig
from alpacare_jax.train import hooks as hooks_lib
from alpacare_jax.train import lora_base, objectives
from alpacare_jax.train import state as state_lib
from alpacare_jax.train import step as step_lib
from alpacare_jax.train.checkpoint import BaseReference, Checkpointer
from alpacare_jax.train.config import HARNESS_HOOK, harness_tasks, llama_config
from alpacare_jax.train.early_stopping import EarlyStopping
from alpacare_jax.train.metrics import MetricsWriter, Throughput, read_metrics
from alpacare_jax.workdir import Workdir

log = logging.getLogger(__name__)


# ---- setup ----------------------------------------------------------------------------------------------

def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_tokenizer(config: ml_collections.ConfigDict, run: Workdir) -> Tokenizer:
    """The run's tokenizer, also saved in the workdir (the workdir alone must rebuild the model).

    Order: `config.tokenizer`, the `init_from_hf` directory, the workdir's own from an earlier start, or
    (demo) one trained on `config.bootstrap.source`.
    """
    if config.tokenizer or config.init_from_hf:
        tokenizer = load_tokenizer(config.tokenizer or config.init_from_hf)
        if _is_primary():
            tokenizer.save(run.tokenizer_dir)
        return tokenizer
    if not run.tokenizer_dir.exists() and config.bootstrap.source:
        if _is_primary():
            bootstrap.ensure_tokenizer(bootstrap.source_file(config.bootstrap.source), run.tokenizer_dir,
                                       config.bootstrap.tokenizer_vocab_size)
        _sync("tokenizer trained")
    if not run.tokenizer_dir.exists():
        raise ValueError("no tokenizer: set config.tokenizer, config.init_from_hf or config.bootstrap.source")
    return run.tokenizer()


def prepare_data(config: ml_collections.ConfigDict, run: Workdir) -> ml_collections.ConfigDict:
    """The data config to read; with `bootstrap.source`, the TFDS dataset is built first if absent."""
    data_config = config.data.copy_and_resolve_references()
    if not config.bootstrap.source:
        return data_config
    if not data_config.data_dir:
        data_config.data_dir = str(run.bootstrap_data_dir)
    if _is_primary():
        bootstrap.ensure_dataset(data_config, bootstrap.source_file(config.bootstrap.source),
                                 config.bootstrap.validation_fraction)
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
    if model_config.lora and config.export_hf and not config.init_from_hf:
        raise ValueError("config.export_hf with LoRA writes a PEFT adapter, which needs the base it adapts "
                         "(config.init_from_hf); export a random base's run with `export_hf --merge`")
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

def train(config: ml_collections.ConfigDict, workdir: str | epath.Path,
          extra_hooks: Sequence[hooks_lib.Hook] = ()) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    if harness_tasks(config) and not any(h.name == HARNESS_HOOK for h in extra_hooks):
        # The harness lives in alpacare_jax.eval, above the trainer: only its entry point can score them.
        raise ValueError(f"config.harness.tasks={config.harness.tasks!r} needs the lm-evaluation-harness hook: "
                         "run `python -m alpacare_jax.eval train` with the same flags (or set "
                         "--config.harness.tasks='')")
    run = Workdir(workdir)

    # Model description, tokenizer and data; written to the workdir before anything is trained.
    model_config = llama_config(config)
    tokenizer = prepare_tokenizer(config, run)
    _validate(config, model_config, tokenizer)
    data_config = prepare_data(config, run)
    total_steps = total_train_steps(config, data_config, tokenizer)
    if _is_primary():
        run.write_description(config, model_config)

    # Mesh, sharded state layout and the jitted update step (the same program `alpacare_jax.aot` compiles).
    program = step_lib.build_train_program(config, model_config, total_steps)
    setup, objective = program.setup, program.objective
    mesh = setup.mesh
    batch_spec = sharding_lib.logical_to_spec(objective.batch_axes, setup.rules)
    train_iter = objective.train_iterator(config, data_config, tokenizer)

    # With LoRA the frozen base is loaded first, whether resuming or not: checkpoints hold only the adapters.
    base, base_reference = _lora_base(config, model_config, setup)

    # Resume from the newest good checkpoint, or start: from `init_from_hf` or from random weights.
    checkpointer = Checkpointer(run.checkpoints_dir, save_every=config.checkpoint_every,
                                keep=config.keep_checkpoints, async_save=config.async_checkpointing,
                                base=base_reference)
    try:
        state = checkpointer.restore_latest(setup.abstract_state, train_iter)
    except BaseException:
        checkpointer.close()  # stops orbax's background threads, which otherwise fail noisily at exit
        raise
    if state is None:
        initial = _initial_adapters(config, model_config, setup) if base else _pretrained_params(
            config, model_config, setup, objective)
        state = state_lib.init_train_state(setup, model_config, program.tx, config.seed, initial, frozen=base)
        start_step = 0
    else:
        state = state.replace(frozen=base)
        start_step = int(state.step)
        log.info("resumed from step %d", start_step)

    # Everything besides the update: evaluation, early stopping on its metric, the end-of-run extras.
    hooks = [*_configured_hooks(config, run, setup, objective, data_config, tokenizer, batch_spec), *extra_hooks]
    writer = MetricsWriter(run, enabled=_is_primary(), resume_step=start_step)
    metric, higher_is_better = objective.selection_metric
    stopper = EarlyStopping(metric, higher_is_better, config.early_stopping_patience)
    if _is_primary() and start_step:
        stopper.replay(read_metrics(run))  # the history up to the checkpoint (the writer dropped the rest)
    throughput = Throughput(model_config.flops_per_token(data_config.max_length),
                            objectives.tokens_per_step(config), mesh.size)
    preemption = PreemptionFlag()
    progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not _is_primary())
    last: dict = {}
    step = start_step
    ended = step >= total_steps or _agree(stopper.should_stop)  # a restarted run that had already finished
    try:
        while not ended:
            batch = pipeline.to_global_batch(next(train_iter), mesh, batch_spec)
            state, metrics = program.train_step(state, batch)
            step += 1
            throughput.step()
            progress.update()

            due = [h for h in hooks if h.due(step) or (h.at_end and step == total_steps)]
            if due or step % config.log_every == 0 or step == start_step + 1:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(throughput.report())
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss is {last['loss']} at step {step}")
                progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['learning_rate']:.2e}")
                last.update(_run_hooks(due, step, state, throughput))
                stopper.observe(step, last)
                writer.write(step, last)

            stop = preemption.should_stop(checkpointer, step)
            ended = step == total_steps or _agree(stopper.should_stop)
            if checkpointer.should_save(step) or ended or stop:
                checkpointer.save(state, train_iter, step=step)
            if stop:
                log.warning("preempted: saved a checkpoint at step %d, exiting", step)
                break
            if ended and step < total_steps:
                log.info("early stopping at step %d: best %s %.4f at step %d, none better in the %d evaluations "
                         "since", step, stopper.metric, stopper.best, stopper.best_step, stopper.since_best)
            if ended:  # the end-of-run hooks that did not just run (e.g. the export after an early stop)
                _run_hooks([h for h in hooks if h.at_end and h not in due], step, state, throughput)
    finally:
        progress.close()
        preemption.restore()
        checkpointer.close()  # waits for the last async save
        writer.close()
    if step == start_step and ended and not preemption.received:
        _run_hooks([h for h in hooks if h.at_end], step, state, throughput)  # nothing left to train: redo the extras
    return last


def _pretrained_params(config, model_config: LlamaConfig, setup, objective) -> dict | None:
    """The starting weights from `config.init_from_hf` (read straight onto their shards), or None."""
    if not config.init_from_hf:
        return None
    model = hf.load_pretrained(config.init_from_hf, dtype=model_config.param_dtype, compute_dtype=model_config.dtype,
                               mesh=setup.mesh, rules=setup.rules, remat_policy=model_config.remat_policy,
                               attention_impl=model_config.attention_impl)
    params = nnx.to_pure_dict(nnx.state(model))
    if objective.name == "multiple_choice":
        params = objectives.initial_params_from_causal_lm(params, model_config, config.seed)
    return params


def _lora_base(config, model_config: LlamaConfig, setup) -> tuple[dict, BaseReference | None]:
    """LoRA's frozen base (`init_from_hf` in `lora.base_dtype`, or with none a random model drawn from `seed`)
    and what checkpoints record of it; ({}, None) for full fine-tuning."""
    if model_config.lora is None:
        return {}, None
    return lora_base.load_base(config, model_config, setup.model_class, setup.abstract_state.frozen, setup.mesh,
                               setup.rules)


def _initial_adapters(config, model_config: LlamaConfig, setup) -> dict | None:
    """The adapters of `lora.init_from_adapter` (a PEFT directory) on their shards, or None: fresh ones."""
    if not config.lora.init_from_adapter:
        return None
    return hf_peft.load_adapter(config.lora.init_from_adapter, model_config, setup.shardings.params)


def _configured_hooks(config, run: Workdir, setup, objective, data_config, tokenizer,
                      batch_spec) -> list[hooks_lib.Hook]:
    """Evaluation (and a test split's, if any) every `eval_every` steps (-1: every epoch) and at the end; the
    export and sample at the end."""
    eval_every = config.eval_every
    if eval_every < 0:
        eval_every = objective.steps_per_epoch(config, data_config, tokenizer)
    eval_step = step_lib.jit_eval_step(setup, objective)
    hooks = [hooks_lib.Hook("evaluation", hooks_lib.evaluation(
        objective, eval_step, lambda: objective.eval_iterator(config, data_config, tokenizer), setup.mesh, batch_spec),
        every=eval_every, at_end=True)]
    if (test_batches := objective.test_batches(config, data_config, tokenizer)) is not None:
        hooks.append(hooks_lib.Hook("test_evaluation", hooks_lib.evaluation(
            objective, eval_step, test_batches, setup.mesh, batch_spec, split="test"), every=eval_every, at_end=True))
    if config.export_hf and setup.shardings.frozen:  # LoRA: the adapters, for PEFT on top of the base
        hooks.append(hooks_lib.Hook("adapter_export", hooks_lib.adapter_export(
            setup.graphdef, tokenizer, run.adapter_export_dir, config.init_from_hf), at_end=True))
    elif config.export_hf:
        hooks.append(hooks_lib.Hook("hf_export", hooks_lib.hf_export(setup.graphdef, tokenizer, run.hf_export_dir),
                                    at_end=True))
    if config.sample_prompt and objective.name == "sft":
        hooks.append(hooks_lib.Hook("sample", hooks_lib.sample_answer(
            setup.graphdef, tokenizer, config.sample_prompt, config.sample_max_new_tokens), at_end=True))
    return hooks


def _run_hooks(hooks: Sequence[hooks_lib.Hook], step: int, state, throughput: Throughput) -> dict[str, float]:
    """Runs `hooks` at `step`; returns the metrics they report. Their time is not training time."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    for hook in hooks:
        metrics.update(hook.fn(step, state) or {})
    throughput.exclude(time.perf_counter() - start)
    return metrics


def _agree(flag: bool) -> bool:
    """Process 0's decision (only it reads the metrics history), the same on every process."""
    if jax.process_count() > 1:
        return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
    return flag
