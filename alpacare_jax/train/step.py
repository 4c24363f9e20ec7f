"""The jitted train and eval steps: pure functions of (TrainState, global batch).

The loss is the mean next-token cross-entropy over the tokens with `loss_mask` 1 in the whole global
batch (every response token weighs the same, however the rows are packed or split). With gradient
accumulation the batch is cut into microbatches that are scanned over, summing loss and gradients,
and divided by the total token count once: the update equals the one-big-batch update.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from alpacare_jax import sharding as sharding_lib
from alpacare_jax.train.state import TrainSetup, TrainState

Batch = dict[str, jax.Array]


def loss_sums(graphdef: nnx.GraphDef, params: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of loss tokens), both float32 scalars."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


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
               schedule: optax.Schedule, accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    grad_fn = jax.value_and_grad(lambda p, b: loss_sums(graphdef, p, b), has_aux=True)
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


def eval_step(params: dict, batch: Batch, *, graphdef: nnx.GraphDef) -> tuple[jax.Array, jax.Array]:
    return loss_sums(graphdef, params, batch)


def jit_train_step(setup: TrainSetup, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   accum_steps: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step` jitted with explicit shardings; the input state is donated (updated in place)."""
    batch_sharding = sharding_lib.batch_sharding(setup.mesh, setup.rules)
    fn = jax.jit(
        lambda state, batch: train_step(state, batch, graphdef=setup.graphdef, tx=tx, schedule=schedule,
                                        accum_steps=accum_steps),
        in_shardings=(setup.shardings, batch_sharding),
        out_shardings=(setup.shardings, sharding_lib.replicated(setup.mesh)),
        donate_argnums=(0,),
    )
    return _under_rules(fn, setup)


def jit_eval_step(setup: TrainSetup) -> Callable[[dict, Batch], tuple[jax.Array, jax.Array]]:
    batch_sharding = sharding_lib.batch_sharding(setup.mesh, setup.rules)
    fn = jax.jit(
        lambda params, batch: eval_step(params, batch, graphdef=setup.graphdef),
        in_shardings=(setup.shardings.params, batch_sharding),
        out_shardings=sharding_lib.replicated(setup.mesh),
    )
    return _under_rules(fn, setup)


def _under_rules(fn: Callable[..., Any], setup: TrainSetup) -> Callable[..., Any]:
    """Calls `fn` with the mesh and logical rules active, so the model's activation constraints apply."""

    def call(*args):
        with sharding_lib.activate(setup.mesh, setup.rules):
            return fn(*args)

    return call
