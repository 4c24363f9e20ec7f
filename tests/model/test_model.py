"""Model behaviour that the HF parity tests do not reach: presets, remat, packing, KV cache, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alpacare_jax.model import KVCache, Llama, LlamaConfig


@pytest.mark.parametrize("name, billions", [
    ("llama1_7b", 6.738), ("llama1_13b", 13.016), ("llama2_7b", 6.738), ("llama2_13b", 13.016),
    ("llama2_70b", 68.977), ("llama3_8b", 8.030), ("llama3_1_8b", 8.030),
])
def test_preset_sizes_match_published_parameter_counts(name, billions):
    assert LlamaConfig.preset(name).num_params() / 1e9 == pytest.approx(billions, abs=0.001)


def test_unknown_preset_and_bad_heads_fail_clearly():
    with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
        LlamaConfig.preset("llama9")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig.tiny(num_heads=4, num_kv_heads=3)


def _loss_and_grads(config, ids):
    model = Llama(config, rngs=nnx.Rngs(0))

    def loss_fn(model):
        logits = model(ids)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return nnx.value_and_grad(loss_fn)(model)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policies_do_not_change_gradients(policy):
    ids = jnp.arange(24).reshape(2, 12) % 256
    loss, grads = _loss_and_grads(LlamaConfig.tiny(), ids)
    loss_remat, grads_remat = _loss_and_grads(LlamaConfig.tiny(remat_policy=policy), ids)
    assert loss == pytest.approx(float(loss_remat), abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_packed_segments_attend_only_within_themselves():
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 256, (1, 7)), rng.integers(0, 256, (1, 5))
    packed = np.concatenate([first, second, np.zeros((1, 4), np.int64)], axis=1)
    segment_ids = np.array([[1] * 7 + [2] * 5 + [0] * 4])
    positions = np.array([list(range(7)) + list(range(5)) + list(range(4))])
    logits = model(jnp.asarray(packed), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_allclose(logits[:, :7], model(jnp.asarray(first)), atol=1e-5)
    np.testing.assert_allclose(logits[:, 7:12], model(jnp.asarray(second)), atol=1e-5)


def test_kv_cache_prefill_then_steps_equals_full_forward():
    config = LlamaConfig.tiny()
    model = Llama(config, rngs=nnx.Rngs(2))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 11)))
    full = model(ids)
    cache = KVCache.empty(config, batch=2, max_length=16)
    logits, cache = model(ids[:, :6], cache=cache)
    chunks = [logits]
    for t in range(6, 11):
        logits, cache = model(ids[:, t:t + 1], cache=cache)
        chunks.append(logits)
    np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=1e-5)
    assert cache.lengths.tolist() == [11, 11]


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32_logits():
    ids = jnp.arange(16).reshape(2, 8)
    fp32 = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(3))
    mixed = Llama(LlamaConfig.tiny(dtype="bfloat16"), rngs=nnx.Rngs(3))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(mixed, nnx.Param))} == {jnp.dtype("float32")}
    logits = mixed(ids)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, fp32(ids), atol=0.05)
    assert not np.allclose(logits, fp32(ids), atol=1e-6)  # bf16 really was used
