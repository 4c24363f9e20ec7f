"""Attention backends behind one function.

`xla` is the reference: plain einsums with an explicit mask that handles causality, packed segments
and KV-cache validity at once, so it runs everywhere and defines the numerics the others must match.
`cudnn` hands the same computation to `jax.nn.dot_product_attention` (flash attention on NVIDIA GPUs).
Grouped-query attention is computed by grouping query heads per KV head, never by repeating K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alpacare_jax.sharding import constrain

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_index: jax.Array, kv_index: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array
) -> jax.Array:
    """[batch, 1, 1, q_len, kv_len] boolean: causal by buffer index, and only within one segment.

    Indices are positions in the token buffer (not rotary positions, which restart per packed example);
    segment id 0 marks padding or unwritten cache slots, which real tokens never attend to.
    """
    causal = kv_index[:, None, :] <= q_index[:, :, None]
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (causal & same_segment)[:, None, None, :, :]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, L, H, D]; k, v [B, S, K, D] with H = K * G; returns [B, L, H, D]."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim ** -0.5)
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, 0], implementation="cudnn")


BACKENDS = {"xla": xla_attention, "cudnn": cudnn_attention}


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, impl: str = "xla"
) -> jax.Array:
    try:
        backend = BACKENDS[impl]
    except KeyError:
        raise ValueError(f"unknown attention_impl {impl!r}; available: {sorted(BACKENDS)}") from None
    out = backend(q, k, v, mask)
    return constrain(out, ("batch", "length", "heads", "head_dim"))
