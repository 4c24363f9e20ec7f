"""The train state as a plain pytree, created directly on its shards.

The NNX model is split once into a static `graphdef` and its parameters; from then on training is a
pure function over `TrainState` (params as a nested dict of arrays, optimizer state, step, RNG key),
which is what jit, donation and orbax want. `nnx.merge(graphdef, state.model_params())` rebuilds the
model inside the traced step.

With LoRA the parameters are split in two: `params` holds the adapters (what is trained, with the
optimizer state mirroring them) and `frozen` the base weights, which get no gradients and no optimizer
state and may be kept in a smaller dtype (`lora.base_dtype`). Without LoRA `frozen` is empty.
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
from alpacare_jax.model import Llama, LlamaConfig, lora


@struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer updates done
    params: dict  # what is trained (fp32 master weights, or the LoRA adapters), like nnx.to_pure_dict(nnx.state(model))
    opt_state: Any
    rng: jax.Array  # [2] uint32 base key; per-step randomness (LoRA dropout) folds in `step`
    frozen: dict = struct.field(default_factory=dict)  # LoRA's base weights, never updated; {} otherwise

    def model_params(self) -> dict:
        """Every parameter of the model (the trained and the frozen ones), for `nnx.merge`."""
        return lora.merge_trees(self.params, self.frozen)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything static about a run's state: how to rebuild the model and where each leaf lives."""

    graphdef: nnx.GraphDef
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings (orbax restore target)
    shardings: TrainState  # NamedSharding per leaf
    mesh: Mesh
    rules: sharding_lib.LogicalRules
    model_class: type = Llama  # the objective's model (`LlamaForScoring` for multiple choice)
    lora_dropout: float = 0.0  # > 0: the train step draws dropout masks for the LoRA adapters


def abstract_model(model_config: LlamaConfig, model_class: type = Llama) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only parameters (with logical axis metadata) without allocating anything."""
    return nnx.split(nnx.eval_shape(lambda: model_class(model_config, rngs=nnx.Rngs(0))))


def split_trainable(params: dict, model_config: LlamaConfig) -> tuple[dict, dict]:
    """(trained, frozen) parts of a model's parameters: (adapters, base) with LoRA, else (all, {})."""
    return lora.split_adapters(params) if model_config.lora else (params, {})


def make_setup(model_config: LlamaConfig, tx: optax.GradientTransformation, mesh: Mesh,
               rules: sharding_lib.LogicalRules, model_class: type = Llama,
               base_dtype: str | None = None) -> TrainSetup:
    """The state layout; with LoRA the frozen base weights are held in `base_dtype` (None: the param dtype)."""
    graphdef, abstract_params_state = abstract_model(model_config, model_class)
    abstract_params, abstract_frozen = split_trainable(nnx.to_pure_dict(abstract_params_state), model_config)
    params_sharding, frozen_sharding = split_trainable(
        sharding_lib.param_shardings(abstract_params_state, mesh, rules), model_config)
    if base_dtype:
        abstract_frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(base_dtype)), abstract_frozen)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding_lib.replicated(mesh)
    shardings = TrainState(
        step=replicated,
        params=params_sharding,
        opt_state=sharding_lib.optimizer_state_shardings(tx, abstract_opt, params_sharding, mesh),
        rng=replicated,
        frozen=frozen_sharding,
    )
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                          opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32), frozen=abstract_frozen)
    return TrainSetup(graphdef, with_shardings(abstract, shardings), shardings, mesh, rules, model_class,
                      model_config.lora.dropout if model_config.lora else 0.0)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that also say where each leaf lives: what orbax restores onto."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_train_state(setup: TrainSetup, model_config: LlamaConfig, tx: optax.GradientTransformation,
                     seed: int, params: dict | None = None, frozen: dict | None = None) -> TrainState:
    """A fresh state, every leaf computed straight onto its shards (jit with out_shardings).

    The full model never exists unsharded on one device, so this scales to models larger than one
    chip's memory. `params` (e.g. loaded from HF, already sharded; with LoRA, adapters) replaces the random
    initialisation of what is trained. With LoRA `frozen` is the base (see `random_base`), kept as it is.
    """
    if bool(frozen) != bool(setup.shardings.frozen):
        raise ValueError("LoRA training needs its frozen base weights (and only LoRA has them)")
    shardings = setup.shardings.replace(frozen={})

    def init(seed, params):
        if params is None:
            params, _ = split_trainable(_random_params(setup.model_class, model_config, seed), model_config)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.PRNGKey(seed))

    # The seed is an argument, not a constant of the program: runs with other seeds reuse its compilation.
    seed = jnp.int32(seed)
    with sharding_lib.activate(setup.mesh, setup.rules):
        if params is None:
            state = jax.jit(lambda s: init(s, None), out_shardings=shardings)(seed)
        else:
            state = jax.jit(init, in_shardings=(setup.shardings.step, setup.shardings.params),
                            out_shardings=shardings)(seed, params)
    # The base joins outside the jitted init: passed through it, it would be copied.
    return state.replace(frozen=frozen or {})


def random_base(model_config: LlamaConfig, model_class: type, seed: int, abstract_frozen: dict) -> dict:
    """LoRA's frozen base when there is no pretrained one: a random model drawn from `seed` (what full
    fine-tuning would start from) in the dtypes and on the shardings of `abstract_frozen`. For tests only."""

    def init(seed):
        _, frozen = split_trainable(_random_params(model_class, model_config, seed), model_config)
        return jax.tree.map(lambda x, a: x.astype(a.dtype), frozen, abstract_frozen)

    return jax.jit(init, out_shardings=jax.tree.map(lambda a: a.sharding, abstract_frozen))(jnp.int32(seed))


def _random_params(model_class: type, model_config: LlamaConfig, seed: jax.Array) -> dict:
    rngs = nnx.Rngs(jax.random.key(seed))
    return nnx.to_pure_dict(nnx.state(model_class(model_config, rngs=rngs)))
