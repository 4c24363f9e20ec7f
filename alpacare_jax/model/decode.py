"""Batched autoregressive decoding with a KV cache: prefill once, then one token per step.

Prompts of different lengths are left-padded to a common bucketed length and each row gets its own
rotary positions (padding never shifts them), so results match decoding each prompt alone. Prompt
length, batch size and cache length are rounded up to buckets, so a server or an evaluation run
compiles a handful of programs instead of one per prompt length. The whole decode (prefill plus a
`lax.while_loop` over steps that stops when every row has emitted EOS) is one jitted program.

Only the sampling rule (temperature, top-k, top-p) is compiled in: the seed and `max_new_tokens` are
traced values (the token buffer is bucketed like the lengths), so a server answering requests with
different `max_tokens` or an evaluation drawing a new seed per batch reuses the same programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpacare_jax.model.llama import KVCache, Llama

LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling settings: {self}")


def bucket(n: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(2 ** np.ceil(np.log2(n)))


def sample_next(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token per row from float32 logits [batch, vocab]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "cache_length", "buffer_length"))
def _decode(graphdef, state, input_ids, segment_ids, eos_ids, max_new_tokens, rng, sampling: SamplingConfig,
            cache_length: int, buffer_length: int):
    model: Llama = nnx.merge(graphdef, state)
    batch = input_ids.shape[0]
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    cache = KVCache.empty(model.config, batch, cache_length)
    logits, cache = model(input_ids, positions=positions, segment_ids=segment_ids, cache=cache)
    next_position = positions[:, -1] + 1

    def emit(step, logits, rng, tokens, done):
        rng, step_rng = jax.random.split(rng)
        token = sample_next(logits, step_rng, sampling)
        tokens = tokens.at[:, step].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, eos_ids)
        return token, rng, tokens, done

    tokens = jnp.full((batch, buffer_length), -1, jnp.int32)
    filler_rows = jnp.sum(segment_ids, axis=1) == 0  # batch padding: done from the start
    token, rng, tokens, done = emit(0, logits[:, -1], rng, tokens, filler_rows)

    def cond(carry):
        step, _, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, position, cache, rng, done, tokens = carry
        logits, cache = model(token[:, None], positions=position[:, None],
                              segment_ids=jnp.ones((batch, 1), jnp.int32), cache=cache)
        token, rng, tokens, done = emit(step, logits[:, -1], rng, tokens, done)
        return step + 1, token, position + 1, cache, rng, done, tokens

    carry = (jnp.int32(1), token, next_position, cache, rng, done, tokens)
    return jax.lax.while_loop(cond, body, carry)[-1]


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    eos_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (token ids, BOS included by the caller), EOS kept, nothing after it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    eos_ids = tuple(model.config.eos_token_ids if eos_ids is None else eos_ids)
    prompt_length = bucket(max(len(p) for p in prompts))
    batch = bucket(len(prompts), (1, 2, 4, 8, 16, 32, 64, 128, 256))
    input_ids = np.zeros((batch, prompt_length), np.int32)
    segment_ids = np.zeros((batch, prompt_length), np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, prompt_length - len(prompt):] = prompt
        segment_ids[row, prompt_length - len(prompt):] = 1
    buffer_length = bucket(sampling.max_new_tokens)
    cache_length = bucket(prompt_length + buffer_length)
    graphdef, state = nnx.split(model)
    compiled_rule = dataclasses.replace(sampling, max_new_tokens=buffer_length, seed=0)
    tokens = _decode(graphdef, state, jnp.asarray(input_ids), jnp.asarray(segment_ids),
                     jnp.asarray(eos_ids, jnp.int32), jnp.int32(sampling.max_new_tokens),
                     jax.random.key(sampling.seed), compiled_rule, cache_length, buffer_length)
    if not tokens.is_fully_addressable:  # several processes: every one gets all rows
        from jax.experimental import multihost_utils

        tokens = multihost_utils.process_allgather(tokens, tiled=True)
    tokens = np.asarray(tokens)[: len(prompts), : sampling.max_new_tokens]
    return [[int(t) for t in row if t >= 0] for row in tokens]
