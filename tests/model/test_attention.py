"""The XLA attention backend (hand-written backward) equals autodiff through a naive softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpacare_jax.model import attention
from alpacare_jax.model.attention import AttentionMask, xla_attention


def _naive(q, k, v, mask):
    """Repeat K/V per query head, mask with -inf, softmax: the textbook definition."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask.dense()[:, 0], scores, -jnp.inf)
    return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(scores, axis=-1), v)


def _packed_mask(batch, length):
    """Two packed examples per row (different split points) and trailing padding."""
    segment_ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        split, end = 5 + 3 * row, length - row
        segment_ids[row, :split], segment_ids[row, split:end] = 1, 2
    return AttentionMask.causal(jnp.asarray(segment_ids))


def _cache_mask(batch, q_len, kv_len):
    """Decoding-style: queries at buffer slots kv_len - q_len.., keys over the whole buffer."""
    q_index = jnp.broadcast_to(jnp.arange(kv_len - q_len, kv_len, dtype=jnp.int32), (batch, q_len))
    kv_index = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    kv_segment_ids = jnp.asarray(np.arange(kv_len)[None, :] >= np.arange(batch)[:, None], jnp.int32)  # left pad
    return AttentionMask(q_index, kv_index, jnp.ones((batch, q_len), jnp.int32), kv_segment_ids)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("mask_kind", ["packed", "packed_blocked", "cache"])
def test_forward_and_gradients_match_naive(heads, kv_heads, mask_kind, monkeypatch):
    # 48 tokens in query blocks of 16 take the causal block-skipping path; blocks of 128 do not.
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 16 if mask_kind == "packed_blocked" else 128)
    batch, length, head_dim = 3, 48, 8
    q_len = 4 if mask_kind == "cache" else length
    mask = _cache_mask(batch, q_len, length) if mask_kind == "cache" else _packed_mask(batch, length)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, q_len, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), jnp.float32) for _ in range(2))
    # Padding queries attend to nothing real; compare only real query rows.
    real = (mask.q_segment_ids > 0)[:, :, None, None]
    loss = lambda attention: lambda q, k, v: jnp.sum(jnp.where(real, jnp.sin(attention(q, k, v, mask)), 0.0))

    np.testing.assert_allclose(jnp.where(real, xla_attention(q, k, v, mask), 0),
                               jnp.where(real, _naive(q, k, v, mask), 0), rtol=1e-5, atol=1e-6)
    got = jax.jit(jax.grad(loss(xla_attention), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_naive), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_bfloat16_gradients_keep_dtype():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
    mask = AttentionMask.causal(jnp.ones((2, 16), jnp.int32))
    grads = jax.grad(lambda q, k, v: jnp.sum(xla_attention(q, k, v, mask).astype(jnp.float32)),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    want = jax.grad(lambda q, k, v: jnp.sum(_naive(q, k, v, mask)), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for g, w in zip(grads, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("heads,kv_heads,q_len", [(4, 4, 1), (4, 2, 3), (6, 1, 1)])
def test_rowwise_cache_attention_reads_each_row_to_its_own_length(heads, kv_heads, q_len, monkeypatch):
    """Rows of different lengths over a stacked cache whose slots are not a multiple of the block (the
    last block is read shifted back), on one device and split over rows and heads on a 2 x 2 mesh (where
    the KV heads divide over it)."""
    from alpacare_jax.sharding import MeshConfig, activate, make_mesh

    monkeypatch.setattr(attention, "CACHE_BLOCK", 16)
    layers, batch, slots, head_dim = 3, 4, 40, 8
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((batch, q_len, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((layers, batch, kv_heads, slots, head_dim)), jnp.float32)
            for _ in range(2))
    lengths = np.asarray([0, 5, 17, slots - q_len])  # cached before the queries; 17: one past a block
    q_slots = jnp.asarray(lengths[:, None] + np.arange(q_len), jnp.int32)
    extents = jnp.asarray(lengths + q_len, jnp.int32).at[0].set(0)  # row 0 has no counted query: skipped
    layer = 1
    mask = AttentionMask(q_index=q_slots, kv_index=jnp.broadcast_to(jnp.arange(slots), (batch, slots)),
                         q_segment_ids=jnp.ones((batch, q_len), jnp.int32),
                         kv_segment_ids=jnp.ones((batch, slots), jnp.int32))
    want = _naive(q, jnp.swapaxes(k[layer], 1, 2), jnp.swapaxes(v[layer], 1, 2), mask).at[0].set(0)
    rowwise = jax.jit(attention.rowwise_cached_attention)
    np.testing.assert_allclose(rowwise(q, k, v, layer, q_slots, extents), want, rtol=1e-5, atol=1e-6)
    if kv_heads % 2 == 0:
        with activate(make_mesh(MeshConfig(fsdp=2, tensor=2), jax.devices()[:4])):
            got = rowwise(q, k, v, layer, q_slots, extents)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
