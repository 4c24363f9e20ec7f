"""The frozen base of a LoRA run: loading it, and what its checkpoints record of it.

A LoRA checkpoint holds adapters only, so whoever restores one (the trainer resuming, `export_hf`, the
inference loaders) loads the base from where the run's config says (`init_from_hf`, or a random model
drawn from `seed` when there is none) and `Checkpointer` checks it against the recorded checksums.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from alpacare_jax import hf
from alpacare_jax import sharding as sharding_lib
from alpacare_jax.model import LlamaConfig
from alpacare_jax.train.checkpoint import BaseReference
from alpacare_jax.train.state import random_base


def base_source(config: Any) -> str:
    """How checkpoints name a run's base: its HF directory, or the random initialisation it was drawn as."""
    return config["init_from_hf"] or f"random initialisation (seed {config['seed']})"


def load_base(config: Any, model_config: LlamaConfig, model_class: type, abstract_frozen: dict, mesh: Mesh,
              rules: sharding_lib.LogicalRules = sharding_lib.DEFAULT_RULES) -> tuple[dict, BaseReference]:
    """(the base weights, its reference) for the training config `config` (a ConfigDict, or the JSON a
    workdir holds), in `lora.base_dtype` (the weights the adapters were trained on, bit for bit) on the
    shardings of `abstract_frozen`."""
    dtype = jnp.dtype(config["lora"]["base_dtype"])
    if config["init_from_hf"]:
        model = hf.load_pretrained(config["init_from_hf"], dtype=dtype, compute_dtype=model_config.dtype,
                                   mesh=mesh, rules=rules)
        base = nnx.to_pure_dict(nnx.state(model))
    else:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding), abstract_frozen)
        base = random_base(model_config, model_class, config["seed"], abstract)
    return base, BaseReference.of(base_source(config), base)
