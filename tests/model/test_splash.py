"""Splash attention (the TPU backend) matches the XLA reference, run in Pallas interpret mode on CPU.

Interpret mode executes the kernel's own block loop, masks and custom backward pass with ordinary XLA
ops, so these tests check the real indexing (GQA head grouping, segment ids, causal block skipping),
not a stand-in; only the TPU lowering itself is covered elsewhere (tests/test_aot.py compiles it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alpacare_jax import sharding
from alpacare_jax.model import KVCache, Llama, LlamaConfig, attention

interpret_splash = functools.partial(attention.splash_attention, interpret=True, block_size=128)


def _packed_segments(batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of 1..n examples of random lengths, then padding (segment id 0)."""
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length - 8), size=3, replace=False))
        row = np.searchsorted(cuts, np.arange(length), side="right") + 1
        row[cuts[-1]:] = 0  # the tail after the last example is padding
        rows.append(row)
    return np.stack(rows).astype(np.int32)


def test_splash_matches_reference_forward_and_gradients_with_gqa_and_packing():
    rng = np.random.default_rng(0)
    batch, length, heads, kv_heads, head_dim = 2, 256, 4, 2, 32
    q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    mask = attention.AttentionMask.causal(jnp.asarray(_packed_segments(batch, length, rng)))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) * cotangent)

    ref_out = attention.xla_attention(q, k, v, mask)
    np.testing.assert_allclose(interpret_splash(q, k, v, mask), ref_out, atol=2e-5, rtol=1e-5)
    ref_grads = jax.grad(functools.partial(loss, attention.xla_attention), argnums=(0, 1, 2))(q, k, v)
    grads = jax.grad(functools.partial(loss, interpret_splash), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_splash_model_matches_xla_on_a_sharded_mesh(monkeypatch):
    """The whole model under a (data 2, fsdp 2, tensor 2) mesh: shard_map splits batch and heads."""
    monkeypatch.setitem(attention.BACKENDS, "splash", interpret_splash)
    config = LlamaConfig.tiny(num_heads=4, num_kv_heads=2, head_dim=32)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (4, 128)))
    segment_ids = jnp.asarray(_packed_segments(4, 128, rng))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))

    def loss_and_grads(impl):
        model = Llama(config.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        @jax.jit
        def fn(params):
            def loss(params):
                logits = nnx.merge(graphdef, params)(ids, segment_ids=segment_ids)
                return jnp.mean(jax.nn.logsumexp(logits, axis=-1) * (segment_ids > 0))
            return jax.value_and_grad(loss)(params)

        with sharding.activate(mesh):
            return fn(params)

    (ref_loss, ref_grads), (loss, grads) = loss_and_grads("xla"), loss_and_grads("splash")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_splash_config_falls_back_to_the_reference_where_splash_does_not_apply():
    """A model trained with splash still decodes with a KV cache and runs odd lengths (reference path)."""
    config = LlamaConfig.tiny()
    splash_model = Llama(config.replace(attention_impl="splash"), rngs=nnx.Rngs(2))
    reference = Llama(config, rngs=nnx.Rngs(2))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 8)))
    logits, _ = splash_model(ids, cache=KVCache.empty(config, batch=2, max_length=16))
    np.testing.assert_allclose(logits, reference(ids), atol=1e-5)
    np.testing.assert_allclose(splash_model(ids), reference(ids), atol=1e-5)
