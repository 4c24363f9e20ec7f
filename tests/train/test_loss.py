"""The fused chunked cross-entropy equals plain autodiff through full logits (optax), value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alpacare_jax import sharding
from alpacare_jax.train.loss import cross_entropy_sum

BATCH, LENGTH, EMBED, VOCAB = 4, 24, 16, 50


def _inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((BATCH, LENGTH, EMBED)), dtype)
    head = jnp.asarray(rng.standard_normal((EMBED, VOCAB)) * 0.5, dtype)
    labels = jnp.asarray(rng.integers(0, VOCAB, (BATCH, LENGTH)), jnp.int32)
    weights = jnp.asarray(rng.random((BATCH, LENGTH)) < 0.7, jnp.float32)  # a loss mask with holes
    return hidden, head, labels, weights


def _reference(hidden, head, labels, weights):
    logits = jnp.einsum("ble,ev->blv", hidden, head, preferred_element_type=jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weights)


@pytest.mark.parametrize("chunk_size", [0, 8, 24, 7, 100])  # whole, dividing, exact, padded, larger
def test_value_and_gradients_match_autodiff(chunk_size):
    hidden, head, labels, weights = _inputs()
    expected, expected_grads = jax.value_and_grad(_reference, argnums=(0, 1))(hidden, head, labels, weights)
    loss = jax.jit(lambda *a: cross_entropy_sum(*a, chunk_size=chunk_size))
    value, grads = jax.jit(jax.value_and_grad(lambda *a: cross_entropy_sum(*a, chunk_size=chunk_size),
                                              argnums=(0, 1)))(hidden, head, labels, weights)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(loss(hidden, head, labels, weights), expected, rtol=1e-6)  # no-gradient path
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grads[0][weights == 0]).max()) == 0.0  # masked positions get no gradient


def test_cotangent_scales_gradients_and_tied_head():
    """A non-unit upstream cotangent (e.g. 1 / token count) and a head that is a transposed embedding."""
    hidden, head, labels, weights = _inputs()
    embedding = head.T

    def ours(hidden, embedding):
        return 0.25 * cross_entropy_sum(hidden, embedding.T, labels, weights, chunk_size=8)

    def reference(hidden, embedding):
        return 0.25 * _reference(hidden, embedding.T, labels, weights)

    got = jax.grad(ours, argnums=(0, 1))(hidden, embedding)
    want = jax.grad(reference, argnums=(0, 1))(hidden, embedding)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_stays_close():
    hidden, head, labels, weights = _inputs(jnp.bfloat16)
    value, grads = jax.value_and_grad(lambda h, w: cross_entropy_sum(h, w, labels, weights, chunk_size=8),
                                      argnums=(0, 1))(hidden, head)
    expected, expected_grads = jax.value_and_grad(_reference, argnums=(0, 1))(hidden, head, labels, weights)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(value, expected, rtol=1e-3)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0.05, atol=0.02)


def test_sharded_over_a_mesh_equals_one_device():
    """Batch over fsdp and the vocabulary over tensor, as the training rules place them."""
    hidden, head, labels, weights = _inputs()
    expected, expected_grads = jax.value_and_grad(_reference, argnums=(0, 1))(hidden, head, labels, weights)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    rules = sharding.DEFAULT_RULES
    with sharding.activate(mesh, rules):
        place = lambda x, names: jax.device_put(x, jax.NamedSharding(mesh, sharding.logical_to_spec(names, rules)))
        args = (place(hidden, ("batch", "length", "embed")), place(head, ("embed", "vocab")),
                place(labels, ("batch", "length")), place(weights, ("batch", "length")))
        value, grads = jax.jit(jax.value_and_grad(lambda *a: cross_entropy_sum(*a, chunk_size=8),
                                                  argnums=(0, 1)))(*args)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
