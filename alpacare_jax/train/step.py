"""The jitted train and eval steps: pure functions of (TrainState, global batch).

The step is the same for every objective (`alpacare_jax.train.objectives`); the objective gives the
loss as (sum, count). For SFT the loss is the mean next-token cross-entropy over the tokens with
`loss_mask` 1 in the whole global batch (every response token weighs the same, however the rows are
packed or split). With gradient
accumulation the batch is cut into microbatches that are scanned over, summing loss and gradients,
and divided by the total token count once: the update equals the one-big-batch update.

Gradients are taken with respect to `state.params` only: with LoRA those are the adapters, and the frozen
base weights (`state.frozen`) enter the loss as constants, so no gradient of theirs is ever formed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from alpacare_jax import sharding as sharding_lib
from alpacare_jax.model import LlamaConfig, lora
from alpacare_jax.train import objectives
from alpacare_jax.train import optimizer as optimizer_lib
from alpacare_jax.train import state as state_lib
from alpacare_jax.train.loss import DEFAULT_CHUNK_SIZE
from alpacare_jax.train.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]


def loss_sums(graphdef: nnx.GraphDef, params: dict, batch: Batch,
              loss_chunk: int = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of loss tokens), both float32 scalars: the SFT loss."""
    return objectives.SupervisedFineTuning(loss_chunk).loss_sums(graphdef, params, batch)


def _microbatches(batch: Batch, accum_steps: int) -> Batch:
    """[B, ...] -> [accum, B/accum, ...], microbatch j taking rows j, j+accum, ...

    Interleaving keeps every microbatch spread over all data-parallel devices (contiguous blocks would
    put each microbatch on a few devices only).
    """

    def split(x):
        rows = x.shape[0]
        if rows % accum_steps:
            raise ValueError(f"global batch of {rows} rows is not divisible by grad_accum_steps={accum_steps}")
        x = x.reshape(rows // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        names = ("batch", "length") if x.ndim == 3 else ("batch",) + (None,) * (x.ndim - 2)
        return sharding_lib.constrain(x, (None, *names))

    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum_steps: int = 1,
               objective: objectives.Objective = objectives.SupervisedFineTuning(), dropout: bool = False,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update; `dropout` draws the LoRA adapters' dropout masks (one key per microbatch)."""
    def loss_sums(params, batch, micro):
        dropout_rng = None
        if dropout:  # the same masks after a restart: the key comes from the saved rng and the step
            dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), micro)
        return objective.loss_sums(graphdef, lora.merge_trees(params, state.frozen), batch, dropout_rng=dropout_rng)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
    if accum_steps == 1:
        (loss_sum, num_tokens), grads = grad_fn(state.params, batch, 0)
    else:
        def body(carry, scanned):
            grads, loss_sum, num_tokens = carry
            micro, index = scanned
            (micro_loss, micro_tokens), micro_grads = grad_fn(state.params, micro, index)
            return (jax.tree.map(jnp.add, grads, micro_grads), loss_sum + micro_loss, num_tokens + micro_tokens), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss_sum, num_tokens), _ = jax.lax.scan(
            body, (zeros, jnp.float32(0), jnp.float32(0)), (_microbatches(batch, accum_steps), jnp.arange(accum_steps)))
    # A batch without loss tokens or questions (possible only with pathological data) gives zero gradients, not NaN.
    denominator = jnp.maximum(num_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = {
        "loss": loss_sum / denominator,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        objective.count_name: num_tokens,
    }
    return new_state, metrics


def _batch_sharding(setup: TrainSetup, objective: objectives.Objective):
    return sharding_lib.logical_sharding(setup.mesh, objective.batch_axes, setup.rules)


def jit_train_step(setup: TrainSetup, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   accum_steps: int = 1, loss_chunk: int = DEFAULT_CHUNK_SIZE,
                   objective: objectives.Objective | None = None,
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step` jitted with explicit shardings; the input state is donated (updated in place).

    `objective` defaults to SFT with `loss_chunk` positions per chunk of the fused loss.
    """
    objective = objective or objectives.SupervisedFineTuning(loss_chunk)
    batch_sharding = _batch_sharding(setup, objective)
    fn = jax.jit(
        lambda state, batch: train_step(state, batch, graphdef=setup.graphdef, tx=tx, schedule=schedule,
                                        accum_steps=accum_steps, objective=objective, dropout=setup.lora_dropout > 0),
        in_shardings=(setup.shardings, batch_sharding),
        out_shardings=(setup.shardings, sharding_lib.replicated(setup.mesh)),
        donate_argnums=(0,),
    )
    return _under_rules(fn, setup)


def jit_eval_step(setup: TrainSetup,
                  objective: objectives.Objective) -> Callable[[dict, Batch], dict[str, jax.Array]]:
    """The objective's evaluation sums of one batch (loss, count, ...) for every parameter of the model
    (`TrainState.model_params()`), jitted like the train step."""
    batch_sharding = _batch_sharding(setup, objective)
    fn = jax.jit(
        lambda params, batch: objective.eval_sums(setup.graphdef, params, batch),
        in_shardings=(setup.shardings.model_params(), batch_sharding),
        out_shardings=sharding_lib.replicated(setup.mesh),
    )
    return _under_rules(fn, setup)


def _under_rules(fn: Callable[..., Any], setup: TrainSetup) -> Callable[..., Any]:
    """Calls `fn` with the mesh and logical rules active, so the model's activation constraints apply.

    `.lower(*abstract_args)` traces the same way without running: ahead-of-time compilation
    (`alpacare_jax.aot`) compiles exactly the function the trainer calls.
    """

    def call(*args):
        with sharding_lib.activate(setup.mesh, setup.rules):
            return fn(*args)

    def lower(*args):
        with sharding_lib.activate(setup.mesh, setup.rules):
            return fn.lower(*args)

    call.lower = lower
    return call


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The mesh, state layout, optimizer and jitted step of a run, built from its config in one place.

    The trainer runs it on real devices; `alpacare_jax.aot` builds it over abstract TPU devices and
    compiles it, so what is measured there is what runs.
    """

    setup: TrainSetup
    objective: objectives.Objective
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]  # also has .lower(state, batch)


def build_train_program(config: ml_collections.ConfigDict, model_config: LlamaConfig, total_steps: int,
                        devices: Sequence[jax.Device] | None = None) -> TrainProgram:
    """Mesh (over `devices`, default all), rules, objective, optimizer, state shardings and the jitted step."""
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(config.mesh), devices)
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    objective = objectives.from_config(config)
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer, total_steps)
    base_dtype = config.lora.base_dtype if model_config.lora else None
    setup = state_lib.make_setup(model_config, tx, mesh, rules, objective.model_class, base_dtype)
    train_step = jit_train_step(setup, tx, schedule, config.grad_accum_steps, objective=objective)
    return TrainProgram(setup, objective, tx, schedule, train_step)
