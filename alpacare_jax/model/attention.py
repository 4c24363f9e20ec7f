"""Attention backends behind one function, and the attention of decoding steps over a KV cache.

`xla` is the reference: einsums with an explicit dense mask that handles causality and packed segments
at once, so it runs everywhere and defines the numerics the others must match (tests hold it to a
textbook softmax attention; its backward is written by hand to save memory traffic, and causal
self-attention skips the masked upper triangle block by block). `cudnn` hands the same computation to
`jax.nn.dot_product_attention` (flash attention on NVIDIA GPUs). `splash` is Pallas splash attention for
TPU: it never materialises the [L, S] mask but takes causality as a static block-sparse mask plus the
segment ids, so it needs the mask's parts rather than the dense mask. That is why backends receive an
`AttentionMask` (the parts) and the dense form is computed only by the backends that want it.
`cached_attention` serves the tokens that continue a cached sequence (decoding steps), on any backend;
`rowwise_cached_attention` is the same over the stacked cache in place, row by row, for XLA's CPU compiler.
Grouped-query attention is computed by grouping query heads per KV head, never by repeating K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from alpacare_jax.sharding import constrain, shard_map_logical

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class AttentionMask:
    """Which keys each query may see, as the parts every backend can use.

    Indices are positions in the token buffer (not rotary positions, which restart per packed example);
    segment id 0 marks padding or unwritten cache slots, which real tokens never attend to.
    `self_attention` (static) says the queries and keys are the same L tokens at buffer slots 0..L-1
    (training and cache-less prefill), so causality is the plain lower triangle that splash attention
    expresses without any index arrays.
    """

    q_index: jax.Array  # [batch, q_len] int32
    kv_index: jax.Array  # [batch, kv_len] int32
    q_segment_ids: jax.Array  # [batch, q_len] int32
    kv_segment_ids: jax.Array  # [batch, kv_len] int32
    self_attention: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def causal(cls, segment_ids: jax.Array) -> AttentionMask:
        """Causal self-attention within segments over one [batch, length] buffer (no cache)."""
        batch, length = segment_ids.shape
        index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return cls(index, index, segment_ids, segment_ids, self_attention=True)

    def dense(self) -> jax.Array:
        """[batch, 1, 1, q_len, kv_len] boolean: causal by buffer index, and only within one segment."""
        causal = self.kv_index[:, None, :] <= self.q_index[:, :, None]
        same_segment = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
        return (causal & same_segment)[:, None, None, :, :]


def _grouped_scores(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled, masked float32 scores [B, K, G, L, S] for grouped queries q [B, L, K, G, D]."""
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
    return jnp.where(mask, scores * (q.shape[-1] ** -0.5), _MASKED)


@jax.custom_vjp
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D), masked) v for grouped queries q [B, L, K, G, D] and k, v [B, S, K, D].

    The gradient is written by hand (the flash-attention backward, without tiling): the forward pass
    keeps only its output and the per-row log-sum-exp, and the backward pass recomputes the
    probabilities from them. Autodiff would instead keep every layer's [L, S] probabilities alive from
    the forward to the backward pass and reduce over S to differentiate the softmax; here that
    reduction is over D (rowsum(dO * O) equals rowsum(dP * P)).
    """
    return _softmax_attention_fwd(q, k, v, mask)[0]


def _softmax_attention_fwd(q, k, v, mask):
    scores = _grouped_scores(q, k, mask)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum("bkgls,bskd->blkgd", (unnormalised / row_sum).astype(v.dtype), v)
    log_sum_exp = row_max + jnp.log(row_sum)
    return out, (q, k, v, mask, out, log_sum_exp)


def _softmax_attention_bwd(saved, out_grad):
    q, k, v, mask, out, log_sum_exp = saved
    probs = jnp.exp(_grouped_scores(q, k, mask) - log_sum_exp)
    v_grad = jnp.einsum("bkgls,blkgd->bskd", probs.astype(v.dtype), out_grad)
    probs_grad = jnp.einsum("blkgd,bskd->bkgls", out_grad, v, preferred_element_type=jnp.float32)
    row_dot = jnp.einsum("blkgd,blkgd->bkgl", out_grad, out, preferred_element_type=jnp.float32)
    scores_grad = (probs * (probs_grad - row_dot[..., None]) * (q.shape[-1] ** -0.5)).astype(q.dtype)
    q_grad = jnp.einsum("bkgls,bskd->blkgd", scores_grad, k)
    k_grad = jnp.einsum("bkgls,blkgd->bskd", scores_grad, q)
    return q_grad, k_grad, v_grad, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


# Causal self-attention is computed in query blocks of this many tokens, each against only the keys
# up to its end: the upper triangle of the score matrix is mostly skipped (with 4 blocks, 10 of 16
# tiles are computed) and each block's scores are small enough to stay in cache.
CAUSAL_BLOCK = 128


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    """q [B, L, H, D]; k, v [B, S, K, D] with H = K * G; returns [B, L, H, D]."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    dense = mask.dense()
    if mask.self_attention and q_len > CAUSAL_BLOCK and q_len % CAUSAL_BLOCK == 0:
        blocks = []
        for start in range(0, q_len, CAUSAL_BLOCK):
            end = start + CAUSAL_BLOCK  # keys after `end` are in every query's future
            blocks.append(_softmax_attention(q[:, start:end], k[:, :end], v[:, :end], dense[..., start:end, :end]))
        out = jnp.concatenate(blocks, axis=1)
    else:
        out = _softmax_attention(q, k, v, dense)
    return out.reshape(batch, q_len, num_heads, head_dim)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slots: jax.Array, *,
                     heads_major: bool = True) -> jax.Array:
    """New queries q [B, L, H, D] over a KV cache k, v [B, K, W, D] (or [B, W, K, D] if not `heads_major`,
    see `KVCache`): the query at cache slot `q_slots[b, l]` sees the slots up to its own (a row's sequence
    fills its slots from 0, so causality is all the masking there is; slots past a row's length are never
    seen, whatever they hold).

    Decoding's attention, whatever `attention_impl` says: a few queries against a long cache is a
    matrix-vector product, which none of the fused kernels serves better. Forward only: nothing is
    differentiated through a cache.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads, window = (k.shape[1], k.shape[2]) if heads_major else (k.shape[2], k.shape[1])
    cache = "bksd" if heads_major else "bskd"
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum(f"blkgd,{cache}->bkgls", q, k, preferred_element_type=jnp.float32) * (head_dim ** -0.5)
    visible = jnp.arange(window, dtype=jnp.int32)[None, None, :] <= q_slots[:, :, None]  # [B, L, W]
    probs = jax.nn.softmax(jnp.where(visible[:, None, None], scores, _MASKED), axis=-1)
    out = jnp.einsum(f"bkgls,{cache}->blkgd", probs.astype(v.dtype), v)
    return out.reshape(batch, q_len, num_heads, head_dim)


CACHE_BLOCK = 128  # slots per block of `rowwise_cached_attention`


def rowwise_cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, layer: jax.Array, q_slots: jax.Array,
                             extents: jax.Array) -> jax.Array:
    """`cached_attention` over layer `layer` of the stacked, heads-major cache k, v [layers, B, K, S, D],
    one row at a time, block by block with an online softmax, each row reading only the blocks below its
    own extent (`extents` [B]: one past the last slot its queries see; 0: the row is skipped, its output 0).

    For XLA's CPU compiler, where decoding rows of very different lengths (a server's slots) is memory
    bound on reading the cache: a dot cannot read a slice of the cache where it lies, so attending over a
    window shared by all rows copied it first (every row padded to the longest row's bucket) and read the
    copy, several passes over memory for one; a row's block is small enough to be copied and read while
    it is in the processor's cache. Runs per shard, so rows and heads split over a mesh stay where they are.
    """

    def local(q, k, v, layer, q_slots, extents):
        batch, q_len, num_heads, head_dim = q.shape
        num_kv_heads, slots = k.shape[2], k.shape[3]
        block = min(CACHE_BLOCK, slots)
        groups = (num_kv_heads, num_heads // num_kv_heads, q_len)
        q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)

        def row(r, out):
            def body(i, carry):
                top, total, acc = carry  # running max [K, G, L], softmax denominator, weighted values
                # dynamic_slice moves a last block that would overrun the slots back to end at the last
                # slot; those below i * block were counted already and are masked out.
                start = jnp.minimum(i * block, slots - block)
                read = lambda cache: jax.lax.dynamic_slice(
                    cache, (layer, r, 0, start, 0), (1, 1, num_kv_heads, block, head_dim))[0, 0]
                scores = jnp.einsum("lkgd,ksd->kgls", q[r], read(k), preferred_element_type=jnp.float32)
                scores = scores * (head_dim ** -0.5)
                slot = start + jnp.arange(block, dtype=jnp.int32)
                visible = (slot >= i * block) & (slot <= q_slots[r][:, None])  # [L, block]
                scores = jnp.where(visible, scores, _MASKED)
                new_top = jnp.maximum(top, scores.max(axis=-1))
                weights = jnp.exp(scores - new_top[..., None])
                rescale = jnp.exp(top - new_top)
                values = jnp.einsum("kgls,ksd->kgld", weights.astype(v.dtype), read(v),
                                    preferred_element_type=jnp.float32)
                return new_top, total * rescale + weights.sum(axis=-1), acc * rescale[..., None] + values

            start = (jnp.full(groups, _MASKED, jnp.float32), jnp.zeros(groups, jnp.float32),
                     jnp.zeros((*groups, head_dim), jnp.float32))
            _, total, acc = jax.lax.fori_loop(0, (extents[r] + block - 1) // block, body, start)
            attended = jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)
            attended = jnp.moveaxis(attended, 2, 0).reshape(q_len, num_heads, head_dim)  # [L, H, D]
            return jax.lax.dynamic_update_index_in_dim(out, attended.astype(out.dtype), r, 0)

        return jax.lax.fori_loop(0, batch, row, jnp.zeros((batch, q_len, num_heads, head_dim), q.dtype))

    heads, cache, rows = ("batch", None, "heads", None), (None, "batch", "kv_heads", None, None), ("batch",)
    return shard_map_logical(local, (heads, cache, cache, (), ("batch", None), rows), heads)(
        q, k, v, layer, q_slots, extents)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, 0], implementation="cudnn")


# ---- splash (TPU) ----------------------------------------------------------------------------------------

_SPLASH_LANES = 128  # the kernel's tiles are multiples of the TPU lane width


def _splash_block(length: int, preferred: int) -> int:
    """The largest tile (a multiple of 128, at most `preferred`) that divides `length`."""
    block = max(preferred - preferred % _SPLASH_LANES, _SPLASH_LANES)
    while length % block:
        block -= _SPLASH_LANES
    return block


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, length: int, block_size: int, interpret: bool):
    """One kernel per shape: the causal mask is static, so its block-sparsity map is built once."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = _splash_block(length, block_size)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(num_heads)])
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, groups: int, block_size: int, interpret: bool):
    """Splash on one device's shard: q [b, L, H, D], k/v [b, L, K, D], segment_ids [b, L]."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    _, length, num_heads, head_dim = q.shape
    if num_heads != k.shape[2] * groups:
        raise ValueError(f"splash attention: this shard holds {num_heads} query heads but {k.shape[2]} KV "
                         f"heads; the sharding rules must split `heads` and `kv_heads` alike (groups of "
                         f"{groups} query heads per KV head)")
    kernel = _splash_kernel(num_heads, length, block_size, interpret)
    # The kernel takes heads first and does not scale the scores; it handles H = K * G natively
    # (query head h reads KV head h // G), so K/V are never repeated.
    q = jnp.swapaxes(q * jnp.asarray(head_dim ** -0.5, q.dtype), 1, 2)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    per_row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=SegmentIds(q=seg, kv=seg))
    return jnp.swapaxes(jax.vmap(per_row)(q, k, v, segment_ids), 1, 2)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *,
                     block_size: int = 512, interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU; `interpret=True` runs the kernel's semantics anywhere, for tests).

    `block_size` is the largest query/key tile (512, as MaxText: smaller tiles skip more of the masked
    upper triangle but pay more per-tile overhead); lengths it does not divide get the largest multiple of
    128 below it that does (e.g. 384 for 1152 tokens).

    Only for causal self-attention over a multiple of 128 tokens (training, and the prefill of prompts
    before decoding); odd lengths (the end-of-training sample) use the XLA reference instead. Decoding
    steps, whose few queries continue a cached sequence, go to `cached_attention`.
    Under an active mesh the kernel runs per shard: batch and heads stay split as the logical rules say,
    the sequence and head_dim are gathered whole (the kernel needs full rows).
    """
    if not mask.self_attention or q.shape[1] % _SPLASH_LANES:
        return xla_attention(q, k, v, mask)
    local = functools.partial(_splash_local, groups=q.shape[2] // k.shape[2], block_size=block_size,
                              interpret=interpret)
    heads, kv_heads, rows = ("batch", None, "heads", None), ("batch", None, "kv_heads", None), ("batch", None)
    return shard_map_logical(local, (heads, kv_heads, kv_heads, rows), heads)(q, k, v, mask.q_segment_ids)


BACKENDS = {"xla": xla_attention, "cudnn": cudnn_attention, "splash": splash_attention}


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, *, impl: str = "xla"
) -> jax.Array:
    try:
        backend = BACKENDS[impl]
    except KeyError:
        raise ValueError(f"unknown attention_impl {impl!r}; available: {sorted(BACKENDS)}") from None
    out = backend(q, k, v, mask)
    return constrain(out, ("batch", "length", "heads", "head_dim"))
