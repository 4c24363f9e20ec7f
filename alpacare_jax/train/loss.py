"""Next-token cross-entropy fused with the output head, computed a chunk of positions at a time.

The logits of a LLaMA batch are its largest tensor by far ([batch, length, vocab] in float32: 0.26 GB
for 4 x 512 tokens of a 32k vocabulary, 1 GB per 2k tokens of LLaMA-3's 128k). Plain autodiff keeps
them, their softmax and their gradient alive at once. Here the head is applied to `chunk_size`
positions at a time and, when a gradient is wanted, each chunk's gradient with respect to the hidden
states and the head is formed right away (softmax minus one-hot, two matmuls), so only one chunk of
logits ever exists and nothing vocabulary-sized is kept for the backward pass. The backward pass is
then just a scaling of those saved gradients. Same idea as the "fused linear cross-entropy" kernels
of Liger and Apple's cut-cross-entropy, in plain JAX so it shards and runs on every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from alpacare_jax.sharding import constrain

# Positions per row projected at a time (the `loss_chunk_size` of a training config): [rows, 128, vocab]
# float32 logits at once. Measured on CPU, 64/256/512 were no faster; on TPU it bounds the logits memory.
DEFAULT_CHUNK_SIZE = 128


def _chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[batch, length, ...] -> [length / chunk_size, batch, chunk_size, ...]."""
    batch, length = x.shape[:2]
    x = x.reshape(batch, length // chunk_size, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _unchunk(x: jax.Array) -> jax.Array:
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _chunk_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
    logits = jnp.einsum("ble,ev->blv", hidden, head, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


def _chunk_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-position negative log-likelihood, log-sum-exp), both [batch, chunk]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return lse - label_logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_loss_sum(hidden, head, labels, weights, chunk_size):
    def body(total, chunk):
        hidden_c, labels_c, weights_c = chunk
        nll, _ = _chunk_nll(_chunk_logits(hidden_c, head), labels_c)
        return total + jnp.sum(nll * weights_c), None

    chunks = (_chunks(hidden, chunk_size), _chunks(labels, chunk_size), _chunks(weights, chunk_size))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total


def _fused_loss_sum_fwd(hidden, head, labels, weights, chunk_size):
    def body(carry, chunk):
        total, head_grad = carry
        hidden_c, labels_c, weights_c = chunk
        logits = _chunk_logits(hidden_c, head)
        nll, lse = _chunk_nll(logits, labels_c)
        # d(sum w * nll)/d logits = w * (softmax - onehot(label)), formed in one fused pass.
        probs = jnp.exp(logits - lse[..., None])
        is_label = jnp.arange(logits.shape[-1], dtype=labels_c.dtype) == labels_c[..., None]
        logits_grad = ((probs - is_label) * weights_c[..., None]).astype(hidden_c.dtype)
        logits_grad = constrain(logits_grad, ("batch", "length", "vocab"))
        hidden_grad = jnp.einsum("blv,ev->ble", logits_grad, head)
        head_grad = head_grad + jnp.einsum("ble,blv->ev", hidden_c, logits_grad, preferred_element_type=jnp.float32)
        head_grad = constrain(head_grad, ("embed", "vocab"))
        return (total + jnp.sum(nll * weights_c), head_grad), hidden_grad

    chunks = (_chunks(hidden, chunk_size), _chunks(labels, chunk_size), _chunks(weights, chunk_size))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, head_grad), hidden_grads = jax.lax.scan(body, init, chunks)
    return total, (_unchunk(hidden_grads), head_grad.astype(head.dtype))


def _fused_loss_sum_bwd(chunk_size, saved, total_grad):
    hidden_grad, head_grad = saved
    return (hidden_grad * total_grad.astype(hidden_grad.dtype), head_grad * total_grad.astype(head_grad.dtype),
            None, None)


_fused_loss_sum.defvjp(_fused_loss_sum_fwd, _fused_loss_sum_bwd)


def cross_entropy_sum(hidden: jax.Array, head: jax.Array, labels: jax.Array, weights: jax.Array, *,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
    """sum over positions of weights * -log softmax(hidden @ head)[label], a float32 scalar.

    hidden [batch, length, embed] and head [embed, vocab] in the compute dtype; labels [batch, length]
    int; weights [batch, length] float32 (the loss mask). `chunk_size` positions are projected at a time
    (0 or >= length: all at once); a length it does not divide is padded with zero-weight positions.
    """
    length = hidden.shape[1]
    chunk_size = length if chunk_size <= 0 else min(chunk_size, length)
    pad = -length % chunk_size
    if pad:
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        hidden, labels, weights = (jnp.pad(x, widths(x)) for x in (hidden, labels, weights))
    return _fused_loss_sum(hidden, head, labels.astype(jnp.int32), weights.astype(jnp.float32), chunk_size)
