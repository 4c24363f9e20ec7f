"""The jitted train and eval steps: pure functions of (TrainState, global batch).

The loss is the mean next-token cross-entropy over the tokens with `loss_mask` 1 in the whole global
batch (every response token weighs the same, however the rows are packed or split). With gradient
accumulation the batch is cut into microbatches that are scanned over, summing loss and gradients,
and divided by the total token count once: the update equals the one-big-batch update.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from alpacare_jax import sharding as sharding_lib
from alpacare_jax.model import LlamaConfig
from alpacare_jax.train import optimizer as optimizer_lib
from alpacare_jax.train import state as state_lib
from alpacare_jax.train.loss import DEFAULT_CHUNK_SIZE, cross_entropy_sum
from alpacare_jax.train.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]


def loss_sums(graphdef: nnx.GraphDef, params: dict, batch: Batch,
              loss_chunk: int = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of loss tokens), both float32 scalars."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden_states(batch["input_ids"], positions=batch["positions"],
                                    segment_ids=batch["segment_ids"])
    head = model.head_weight().astype(model.config.dtype)
    mask = batch["loss_mask"].astype(jnp.float32)
    return cross_entropy_sum(hidden, head, batch["labels"], mask, chunk_size=loss_chunk), jnp.sum(mask)


def _microbatches(batch: Batch, accum_steps: int) -> Batch:
    """[B, L] -> [accum, B/accum, L], microbatch j taking rows j, j+accum, ...

    Interleaving keeps every microbatch spread over all data-parallel devices (contiguous blocks would
    put each microbatch on a few devices only).
    """

    def split(x):
        rows, length = x.shape
        if rows % accum_steps:
            raise ValueError(f"global batch of {rows} rows is not divisible by grad_accum_steps={accum_steps}")
        x = x.reshape(rows // accum_steps, accum_steps, length).swapaxes(0, 1)
        return sharding_lib.constrain(x, (None, "batch", "length"))

    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: Batch, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, accum_steps: int = 1,
               loss_chunk: int = DEFAULT_CHUNK_SIZE) -> tuple[TrainState, dict[str, jax.Array]]:
    grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b, loss_chunk), has_aux=True)
    if accum_steps == 1:
        (loss_sum, num_tokens), grads = grad_fn(state.params, batch)
    else:
        def body(carry, micro):
            grads, loss_sum, num_tokens = carry
            (micro_loss, micro_tokens), micro_grads = grad_fn(state.params, micro)
            return (jax.tree.map(jnp.add, grads, micro_grads), loss_sum + micro_loss, num_tokens + micro_tokens), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss_sum, num_tokens), _ = jax.lax.scan(
            body, (zeros, jnp.float32(0), jnp.float32(0)), _microbatches(batch, accum_steps))
    # A batch without loss tokens (possible only with pathological data) gives zero gradients, not NaN.
    denominator = jnp.maximum(num_tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    metrics = {
        "loss": loss_sum / denominator,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "loss_tokens": num_tokens,
    }
    return new_state, metrics


def eval_step(params: dict, batch: Batch, *, graphdef: nnx.GraphDef,
              loss_chunk: int = DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    return loss_sums(graphdef, params, batch, loss_chunk)


def jit_train_step(setup: TrainSetup, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   accum_steps: int = 1,
                   loss_chunk: int = DEFAULT_CHUNK_SIZE) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step` jitted with explicit shardings; the input state is donated (updated in place)."""
    batch_sharding = sharding_lib.batch_sharding(setup.mesh, setup.rules)
    fn = jax.jit(
        lambda state, batch: train_step(state, batch, graphdef=setup.graphdef, tx=tx, schedule=schedule,
                                        accum_steps=accum_steps, loss_chunk=loss_chunk),
        in_shardings=(setup.shardings, batch_sharding),
        out_shardings=(setup.shardings, sharding_lib.replicated(setup.mesh)),
        donate_argnums=(0,),
    )
    return _under_rules(fn, setup)


def jit_eval_step(setup: TrainSetup,
                  loss_chunk: int = DEFAULT_CHUNK_SIZE) -> Callable[[dict, Batch], tuple[jax.Array, jax.Array]]:
    batch_sharding = sharding_lib.batch_sharding(setup.mesh, setup.rules)
    fn = jax.jit(
        lambda params, batch: eval_step(params, batch, graphdef=setup.graphdef, loss_chunk=loss_chunk),
        in_shardings=(setup.shardings.params, batch_sharding),
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
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]  # also has .lower(state, batch)


def build_train_program(config: ml_collections.ConfigDict, model_config: LlamaConfig, total_steps: int,
                        devices: Sequence[jax.Device] | None = None) -> TrainProgram:
    """Mesh (over `devices`, default all), rules, optimizer, state shardings and the jitted train step."""
    mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig.from_config(config.mesh), devices)
    rules = sharding_lib.rules_from_config(config.sharding_rules)
    tx, schedule = optimizer_lib.make_optimizer(config.optimizer, total_steps)
    setup = state_lib.make_setup(model_config, tx, mesh, rules)
    train_step = jit_train_step(setup, tx, schedule, config.grad_accum_steps, config.loss_chunk_size)
    return TrainProgram(setup, tx, schedule, train_step)
