"""LoRA (Hu et al., 2021): low-rank adapters on the decoder's projections, in PEFT's conventions.

A targeted projection with weight W [in..., out...] computes

    y = x @ W + scale * (dropout(x) @ A) @ B,    A [in..., rank], B [rank, out...]

so training A and B (a few million numbers) adapts a model whose W stay frozen. As in PEFT, A starts
kaiming-uniform and B at zero (a fresh adapter leaves the model's output unchanged), `scale` is
alpha / rank (alpha / sqrt(rank) with rsLoRA), and dropout applies to the adapter's input only.

Adapters live beside their projections under `<target>_lora` (`attention/q_lora/{a,b}` next to
`attention/q_proj`), which is how `split_adapters` tells them from the base weights; they carry logical axis
names like every parameter (the rank axis is `lora_rank`) and shard by the same rules. `merge_adapters`
folds trained adapters into the base weights (W + scale * A @ B): what inference and a merged export use,
so a served model pays nothing for having been trained with LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from alpacare_jax.model.config import LORA_TARGETS, LlamaConfig

# Each target's projection weight: (module, parameter) inside a decoder layer.
PROJECTIONS = {
    "q": ("attention", "q_proj"), "k": ("attention", "k_proj"), "v": ("attention", "v_proj"),
    "o": ("attention", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


def adapter_name(target: str) -> str:
    """The attribute holding a target's adapter, beside its projection ("q" -> "q_lora")."""
    return f"{target}_lora"


def _kaiming_uniform(key, shape, dtype, fan_in: int):
    # PEFT's lora_A init: torch's kaiming_uniform_(a=sqrt(5)), a uniform of bound 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoraAdapter(nnx.Module):
    """scale * (dropout(x) @ A) @ B for inputs x [..., in...]; the caller adds it to the projection's output."""

    def __init__(self, config: LlamaConfig, target: str, in_shape: Sequence[int], out_shape: Sequence[int],
                 in_names: tuple[str, ...], out_names: tuple[str, ...], *, rngs: nnx.Rngs):
        lora = config.lora
        dtype = jnp.dtype(config.param_dtype)
        self.compute_dtype = jnp.dtype(config.dtype)
        self.num_in = len(in_shape)
        self.scale = lora.scale
        self.dropout = lora.dropout
        self.salt = LORA_TARGETS.index(target)  # each adapter draws its own dropout mask from the layer's key
        a = _kaiming_uniform(rngs.params(), (*in_shape, lora.rank), dtype, math.prod(in_shape))
        self.a = nnx.Param(a, out_sharding=(*in_names, "lora_rank"), eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((lora.rank, *out_shape), dtype), out_sharding=("lora_rank", *out_names),
                           eager_sharding=False)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        if dropout_rng is not None and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, self.salt), 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
        lead, features = x.shape[:-self.num_in], x.shape[-self.num_in:]
        # One token axis, as in `llama.token_matmul`: the weight gradients then contract a single axis.
        tokens = x.reshape(-1, *features)
        low = jnp.tensordot(tokens, self.a[...].astype(self.compute_dtype), axes=self.num_in) * self.scale
        out = jnp.tensordot(low.astype(self.compute_dtype), self.b[...].astype(self.compute_dtype), axes=1)
        return out.reshape(*lead, *out.shape[1:])


def adapter(config: LlamaConfig, target: str, in_shape: Sequence[int], out_shape: Sequence[int],
            in_names: tuple[str, ...], out_names: tuple[str, ...], *, rngs: nnx.Rngs) -> LoraAdapter | None:
    """The adapter of `target`'s projection when the config's LoRA targets it, else None."""
    if config.lora is None or target not in config.lora.targets:
        return None
    return LoraAdapter(config, target, in_shape, out_shape, in_names, out_names, rngs=rngs)


def adapted(out: jax.Array, lora: LoraAdapter | None, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
    """A projection's output `out` of input `x`, plus its adapter's when it has one."""
    return out if lora is None else out + lora(x, dropout_rng).astype(out.dtype)


# ---- whole parameter trees ------------------------------------------------------------------------------

def split_adapters(params: dict) -> tuple[dict, dict]:
    """(adapters, everything else) of a model's nested parameter dict; adapters keep their paths."""
    adapters, rest = {}, {}
    for key, value in params.items():
        if isinstance(key, str) and key.endswith("_lora"):
            adapters[key] = value
        elif isinstance(value, dict):
            inner_adapters, inner_rest = split_adapters(value)
            if inner_adapters:
                adapters[key] = inner_adapters
            if inner_rest:
                rest[key] = inner_rest
        else:
            rest[key] = value
    return adapters, rest


def merge_trees(a: dict, b: dict) -> dict:
    """The union of two nested dicts with no leaf in common (adapters and base weights, say)."""
    if not b:
        return a
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merge_trees(merged[key], value) if isinstance(merged.get(key), dict) else value
    return merged


def merge_adapters(params: dict, config: LlamaConfig) -> dict:
    """The base weights with every adapter folded in (W + scale * A @ B), adapters removed.

    A model built from `config.replace(lora=None)` with these parameters computes what the adapted model
    computes, without the adapters' extra matmuls. A merged weight takes the wider of W's dtype and the
    model's `param_dtype`: a bf16 base with fp32 adapters merges in fp32, since rounding W + scale * A @ B to
    bf16 (steps of |W| / 256) would blur the small update the adapters add; ask for a bf16 model
    (`param_dtype="bfloat16"`) to merge into bf16.
    """
    adapters, merged = split_adapters(params)
    layers = {module: dict(values) for module, values in merged["layers"].items()}
    for target in config.lora.targets:
        module, projection = PROJECTIONS[target]
        lora = adapters["layers"][module][adapter_name(target)]
        weight = layers[module][projection]
        delta = jax.vmap(lambda a, b: jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1))(
            lora["a"], lora["b"])
        dtype = jnp.promote_types(weight.dtype, config.param_dtype)
        layers[module][projection] = (weight.astype(jnp.float32) + config.lora.scale * delta).astype(dtype)
    return {**merged, "layers": layers}


def merged_model(model: nnx.Module) -> nnx.Module:
    """`model` (a `Llama` or `LlamaForScoring`) with its adapters folded into its weights: a plain model of
    the same class and outputs, decoding at the plain model's speed. Without adapters, `model` itself."""
    config = model.config
    if config.lora is None:
        return model
    params = _merge_adapters_jit(nnx.to_pure_dict(nnx.state(model)), config)
    plain = config.replace(lora=None)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(model)(plain, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params)


_merge_adapters_jit = jax.jit(merge_adapters, static_argnums=1)
