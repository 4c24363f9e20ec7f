"""LLaMA-1/2/3 decoder in Flax NNX.

Every parameter carries logical axis names (see `alpacare_jax.sharding` for how they become mesh axes).
The decoder layers are stored stacked along a leading `layers` axis and run with `jax.lax.scan`, so
compile time does not grow with depth and `remat_policy` applies to one layer body.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from alpacare_jax.model.attention import AttentionMask, dot_product_attention
from alpacare_jax.model.config import LlamaConfig
from alpacare_jax.model.rope import apply_rotary, inverse_frequencies
from alpacare_jax.sharding import constrain

_INIT = nnx.initializers.normal(stddev=0.02)

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def token_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out], computed as one [tokens, in] @ [in, out] matmul between reshapes.

    Why not `x @ kernel` on [batch, length, in]: the weight gradient then contracts two axes (batch and
    length), and XLA's CPU backend first wrote each [tokens, mlp] gradient out again transposed, a third
    of the MLP's forward + backward time. With one token axis it reads them as they are. The attention
    projections keep their einsums: reshaping their [embed, heads, head_dim] weights to 2-D made XLA
    all-gather them twice per layer on TPU (the AOT-compiled step had 3 more all-gathers per layer) and
    gained nothing measurable on CPU.
    """
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def _param(rngs: nnx.Rngs, shape: Sequence[int], names: tuple[str, ...], config: LlamaConfig, init=_INIT):
    value = init(rngs.params(), tuple(shape), jnp.dtype(config.param_dtype))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_length` buffer slots, plus which slots hold real tokens.

    `segment_ids` is 0 for empty slots and left padding, so the attention mask needs no other state;
    `index` is the next slot to write (shared by all rows: prompts are left-padded to a common length).
    """

    k: jax.Array  # [layers, batch, max_length, kv_heads, head_dim]
    v: jax.Array
    segment_ids: jax.Array  # [batch, max_length]
    index: jax.Array  # [] int32

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_length: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
            segment_ids=jnp.zeros((batch, max_length), jnp.int32), index=jnp.zeros((), jnp.int32),
        )


class RMSNorm(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.dtype = jnp.dtype(config.dtype)
        self.scale = _param(rngs, (config.hidden_size,), ("embed",), config, nnx.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        # As in HF: normalise in float32, cast back, then scale (matters for bf16 parity).
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.config = config
        self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), config)
        self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), config)
        self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), config)
        self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), config)

    def __call__(self, x, positions, mask, cache_kv=None, cache_index=None):
        dtype = jnp.dtype(self.config.dtype)
        q = jnp.einsum("ble,ehd->blhd", x, self.q_proj[...].astype(dtype))
        k = jnp.einsum("ble,ekd->blkd", x, self.k_proj[...].astype(dtype))
        v = jnp.einsum("ble,ekd->blkd", x, self.v_proj[...].astype(dtype))
        inv_freq = inverse_frequencies(self.config)  # numpy: a compile-time constant, not model state
        q = constrain(apply_rotary(q, positions, inv_freq), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rotary(k, positions, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if cache_kv is not None:
            k_cache, v_cache = cache_kv
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            cache_kv = (k, v)
        out = dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask, impl=self.config.attention_impl)
        out = jnp.einsum("blhd,hde->ble", out, self.o_proj[...].astype(dtype))
        return out, cache_kv


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose backward pass keeps only `gate` and `up`.

    Autodiff of `jax.nn.silu(gate) * up` keeps four [tokens, mlp] tensors per layer for the backward
    pass and reads them all again; the derivative is cheap to recompute from the two inputs. That saves
    about 5% of a CPU training step, and half of those tensors' memory when layers are not rematerialised.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(saved, out_grad):
    gate, up = saved
    gate32, up32, out_grad32 = (x.astype(jnp.float32) for x in (gate, up, out_grad))
    sigmoid = jax.nn.sigmoid(gate32)
    silu = gate32 * sigmoid
    gate_grad = out_grad32 * up32 * sigmoid * (1 + gate32 * (1 - sigmoid))
    return gate_grad.astype(gate.dtype), (out_grad32 * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.dtype = jnp.dtype(config.dtype)
        self.gate_proj = _param(rngs, (e, m), ("embed", "mlp"), config)
        self.up_proj = _param(rngs, (e, m), ("embed", "mlp"), config)
        self.down_proj = _param(rngs, (m, e), ("mlp", "embed"), config)

    def __call__(self, x):
        gate = token_matmul(x, self.gate_proj[...].astype(self.dtype))
        up = token_matmul(x, self.up_proj[...].astype(self.dtype))
        hidden = constrain(swiglu(gate, up), ("batch", "length", "mlp"))
        return token_matmul(hidden, self.down_proj[...].astype(self.dtype))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.post_attention_norm = RMSNorm(config, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, mask, cache_kv=None, cache_index=None):
        attn_out, cache_kv = self.attention(self.input_norm(x), positions, mask, cache_kv, cache_index)
        x = constrain(x + attn_out, ("batch", "length", "embed"))
        x = constrain(x + self.mlp(self.post_attention_norm(x)), ("batch", "length", "embed"))
        return x, cache_kv


class LlamaBackbone(nnx.Module):
    """The decoder stack shared by every head: token embeddings, scanned layers, final norm."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), config)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config, rngs=rngs)

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The final-normed hidden states [batch, length, embed] that the output head projects.

        Separate from `__call__` so the training loss can apply the head chunk by chunk without ever
        holding the full [batch, length, vocab] logits (see `alpacare_jax.train.loss`).
        """
        config = self.config
        batch, length = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        if cache is None:
            mask, cache_index = AttentionMask.causal(segment_ids), None
        else:
            cache_index = cache.index
            q_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)) + cache_index
            kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache_index))
            kv_index = jnp.broadcast_to(jnp.arange(kv_segment_ids.shape[1], dtype=jnp.int32), kv_segment_ids.shape)
            mask = AttentionMask(q_index, kv_index, segment_ids, kv_segment_ids)
        if positions is None:
            positions = mask.q_index

        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(config.dtype)
        x = constrain(x, ("batch", "length", "embed"))

        graphdef, layer_state = nnx.split(self.layers)

        def layer_body(x, scanned):
            state, cache_kv = scanned
            x, cache_kv = nnx.merge(graphdef, state)(x, positions, mask, cache_kv, cache_index)
            return x, cache_kv

        if config.remat_policy != "none":
            layer_body = jax.checkpoint(layer_body, policy=REMAT_POLICIES[config.remat_policy])
        cache_kv = None if cache is None else (cache.k, cache.v)
        x, new_cache_kv = jax.lax.scan(layer_body, x, (layer_state, cache_kv))

        x = self.norm(x)
        if cache is None:
            return x, None
        new_cache = KVCache(
            k=new_cache_kv[0], v=new_cache_kv[1], segment_ids=kv_segment_ids, index=cache_index + length
        )
        return x, new_cache


class Llama(LlamaBackbone):
    """Causal LM: `model(input_ids)` -> float32 logits [batch, length, vocab]."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), config)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Float32 logits for `input_ids` [batch, length] (and the updated cache when given one).

        `positions` (rotary positions, restarting per packed example) default to 0..length-1 (after the
        cache's filled slots when decoding). `segment_ids` number packed examples 1, 2, ... and mark
        padding with 0; attention stays inside a segment. With `cache`, the new keys/values are written
        at `cache.index` and `(logits, updated_cache)` is returned.
        """
        hidden, new_cache = self.hidden_states(input_ids, positions=positions, segment_ids=segment_ids, cache=cache)
        head = self.head_weight().astype(self.config.dtype)
        logits = jnp.einsum("ble,ev->blv", hidden, head, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits if cache is None else (logits, new_cache)

    def head_weight(self) -> jax.Array:
        """The [embed, vocab] output projection (the transposed embedding when tied)."""
        return self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]


class LlamaForScoring(LlamaBackbone):
    """One score per sequence: a linear head on the final hidden state of its last real token.

    `model(input_ids, lengths)` -> float32 scores [batch]. This is Hugging Face's
    `LlamaForSequenceClassification` with `num_labels=1` (same `score` weight, no bias, same pooling
    on the last non-padding token); the multiple-choice objective scores each (question, option) row
    with it and takes a softmax across a question's options. Rows are right-padded: padding sits after
    the pooled token, so causal attention never lets it change the score.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.score = _param(rngs, (config.hidden_size, 1), ("embed", "classes"), config)

    def __call__(self, input_ids: jax.Array, lengths: jax.Array) -> jax.Array:
        """Scores of `input_ids` [batch, length] whose first `lengths` [batch] tokens are real."""
        length = input_ids.shape[1]
        segment_ids = (jnp.arange(length, dtype=jnp.int32) < lengths[:, None]).astype(jnp.int32)
        hidden, _ = self.hidden_states(input_ids, segment_ids=segment_ids)
        last = jnp.clip(lengths - 1, 0, length - 1).astype(jnp.int32)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [batch, embed]
        score = self.score[...].astype(self.config.dtype)
        return jnp.einsum("be,ec->bc", pooled, score, preferred_element_type=jnp.float32)[:, 0]
