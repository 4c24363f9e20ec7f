"""The train state as a plain pytree, created directly on its shards.

The NNX model is split once into a static `graphdef` and its parameters; from then on training is a
pure function over `TrainState` (params as a nested dict of arrays, optimizer state, step, RNG key),
which is what jit, donation and orbax want. `nnx.merge(graphdef, params)` rebuilds the model inside
the traced step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from alpacare_jax import sharding as sharding_lib
from alpacare_jax.model import Llama, LlamaConfig


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer updates done
    params: dict  # fp32 master weights, nested dict like nnx.to_pure_dict(nnx.state(model))
    opt_state: Any
    rng: jax.Array  # [2] uint32 base key; per-step randomness (none yet: no dropout) folds in `step`


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything static about a run's state: how to rebuild the model and where each leaf lives."""

    graphdef: nnx.GraphDef
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (orbax restore target)
    shardings: TrainState  # NamedSharding per leaf
    mesh: Mesh
    rules: sharding_lib.LogicalRules
    model_class: type = Llama  # the objective's model (`LlamaForScoring` for multiple choice)


def abstract_model(model_config: LlamaConfig, model_class: type = Llama) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only parameters (with logical axis metadata) without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: model_class(model_config, rngs=nnx.Rngs(0))))


def make_setup(model_config: LlamaConfig, tx: optax.GradientTransformation, mesh: Mesh,
               rules: sharding_lib.LogicalRules, model_class: type = Llama) -> TrainSetup:
    graphdef, abstract_params_state = abstract_model(model_config, model_class)
    params_sharding = sharding_lib.param_shardings(abstract_params_state, mesh, rules)
    abstract_params = nnx.to_pure_dict(abstract_params_state)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding_lib.replicated(mesh)
    shardings = TrainState(
        step=replicated,
        params=params_sharding,
        opt_state=sharding_lib.optimizer_state_shardings(tx, abstract_opt, params_sharding, mesh),
        rng=replicated,
    )
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return TrainSetup(graphdef, with_shardings(abstract, shardings), shardings, mesh, rules, model_class)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that also say where each leaf lives: what orbax restores onto."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_train_state(setup: TrainSetup, model_config: LlamaConfig, tx: optax.GradientTransformation,
                     seed: int, params: dict | None = None) -> TrainState:
    """A fresh state, every leaf computed straight onto its shards (jit with out_shardings).

    The full model never exists unsharded on one device, so this scales to models larger than one
    chip's memory. `params` (e.g. loaded from HF, already sharded) replaces the random initialisation.
    """

    def init(params):
        if params is None:
            params = nnx.to_pure_dict(nnx.state(setup.model_class(model_config, rngs=nnx.Rngs(seed))))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(seed))

    with sharding_lib.activate(setup.mesh, setup.rules):
        if params is None:
            return jax.jit(lambda: init(None), out_shardings=setup.shardings)()
        return jax.jit(init, in_shardings=(setup.shardings.params,), out_shardings=setup.shardings)(params)
