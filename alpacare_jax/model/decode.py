"""Batched autoregressive decoding with a KV cache: prefill once, then one token per step.

Prompts of different lengths are left-padded to a common bucketed length and each row gets its own
rotary positions (padding never shifts them), so results match decoding each prompt alone. Prompt
length, batch size and cache length are rounded up to buckets, so a server or an evaluation run
compiles a handful of programs instead of one per prompt length.

Two ways to run the same steps:
* `generate`: the whole decode (prefill plus a `lax.while_loop` over steps that stops when every row
  has emitted EOS) is one jitted program: the fastest way to answer a batch.
* `decode_chunks`: prefill, then short jitted chunks of steps that carry the KV cache (donated, so it
  is updated in place) from one call to the next, yielding each chunk's tokens as soon as it is done:
  what a server streams from, and where it can stop rows whose client has gone or hit a stop string.

Nothing about a request is compiled in: the sampling settings (temperature, top-k, top-p), the seed
and `max_new_tokens` are per-row traced values, so rows with different settings share one batch and
new values reuse the compiled programs. Each row draws from its own key, folded with the step number,
so a sampled answer depends only on its seed, not on its batch neighbours or on the chunking.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alpacare_jax.model.llama import KVCache, Llama

LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        # `not x >= 0` also refuses NaN, which every comparison fails.
        if not (math.isfinite(self.temperature) and self.temperature >= 0 and 0 < self.top_p <= 1
                and self.top_k >= 0):
            raise ValueError(f"invalid sampling settings: {self}")


@struct.dataclass
class SamplingParams:
    """The sampling settings of each row as arrays [batch]: traced, so new values compile nothing."""

    temperature: jax.Array  # float32, 0: greedy
    top_p: jax.Array  # float32, 1: no filter
    top_k: jax.Array  # int32, 0: no filter

    @classmethod
    def of(cls, configs: Sequence[SamplingConfig], batch: int | None = None) -> "SamplingParams":
        """One row per config, then greedy rows up to `batch` (the batch padding)."""
        pad = [SamplingConfig()] * ((batch or len(configs)) - len(configs))
        rows = [*configs, *pad]
        return cls(temperature=jnp.asarray([c.temperature for c in rows], jnp.float32),
                   top_p=jnp.asarray([c.top_p for c in rows], jnp.float32),
                   top_k=jnp.asarray([c.top_k for c in rows], jnp.int32))


def bucket(n: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(2 ** np.ceil(np.log2(n)))


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Logits [batch, vocab] divided by each row's temperature, with tokens outside its top-k / top-p at -inf.

    One descending sort serves both filters, since top_k is a traced value (`lax.top_k` needs a static k).
    """
    vocab = logits.shape[-1]
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    logits = logits / temperature
    ranked = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(ranked, jnp.clip(params.top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    kth = jnp.where(params.top_k[:, None] > 0, kth, -jnp.inf)
    ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    cumulative = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    cutoff_index = jnp.minimum(jnp.sum(cumulative < params.top_p[:, None], axis=-1, keepdims=True), vocab - 1)
    cutoff = jnp.take_along_axis(ranked, cutoff_index, axis=-1)
    cutoff = jnp.where(params.top_p[:, None] < 1.0, cutoff, -jnp.inf)
    return jnp.where(logits < jnp.maximum(kth, cutoff), -jnp.inf, logits)


def sample_next(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig | SamplingParams) -> jax.Array:
    """Next token per row from float32 logits [batch, vocab].

    `rng` is one key (rows draw independently from it) or one key per row. Greedy rows take the argmax;
    the sort and draw run only when some row samples.
    """
    if isinstance(sampling, SamplingConfig):
        sampling = SamplingParams.of([sampling] * logits.shape[0])
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        filtered = filter_logits(logits, sampling)
        if rng.ndim == 0:
            return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
        return jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, filtered).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(sampling.temperature > 0), draw, lambda: greedy)
    return jnp.where(sampling.temperature > 0, sampled, greedy)


@struct.dataclass
class DecodeState:
    """Everything a decode carries from one step (or chunk) to the next; lives on the device."""

    cache: KVCache
    token: jax.Array  # [batch] the last emitted token, the next step's input
    position: jax.Array  # [batch] its rotary position
    done: jax.Array  # [batch] bool: EOS emitted, max_new_tokens reached, stopped, or batch padding
    step: jax.Array  # [] int32: tokens emitted so far (rows that are done emit -1)
    keys: jax.Array  # [batch] each row's base key; step s draws with fold_in(key, s)
    max_new_tokens: jax.Array  # [batch] int32
    sampling: SamplingParams


def _emit(state: DecodeState, logits: jax.Array, eos_ids: jax.Array) -> tuple[DecodeState, jax.Array]:
    """Samples this step's token of every row; rows already done emit -1."""
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, state.step)
    token = sample_next(logits, step_keys, state.sampling)
    emitted = jnp.where(state.done, -1, token)
    done = state.done | jnp.isin(token, eos_ids) | (state.step + 1 >= state.max_new_tokens)
    return state.replace(token=token, done=done, step=state.step + 1), emitted


def _row_key(seed_and_stream: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed_and_stream[0]), seed_and_stream[1])


def _prefill(model: Llama, input_ids, segment_ids, eos_ids, max_new_tokens, seeds, sampling: SamplingParams,
             cache_length: int) -> tuple[DecodeState, jax.Array]:
    """Runs the prompts through the model, filling the cache, and emits the first token [batch]."""
    batch = input_ids.shape[0]
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    cache = KVCache.empty(model.config, batch, cache_length)
    logits, cache = model(input_ids, positions=positions, segment_ids=segment_ids, cache=cache)
    filler_rows = jnp.sum(segment_ids, axis=1) == 0  # batch padding: done from the start
    state = DecodeState(cache=cache, token=jnp.zeros((batch,), jnp.int32), position=positions[:, -1],
                        done=filler_rows, step=jnp.int32(0), keys=jax.vmap(_row_key)(seeds),
                        max_new_tokens=max_new_tokens, sampling=sampling)
    return _emit(state, logits[:, -1], eos_ids)


def _advance(model: Llama, state: DecodeState, eos_ids, steps: int) -> tuple[DecodeState, jax.Array]:
    """Up to `steps` more tokens per row [batch, steps] (-1 where done), stopping early once every row is done."""
    batch = state.token.shape[0]
    tokens = jnp.full((batch, steps), -1, jnp.int32)

    def cond(carry):
        i, state, _ = carry
        return (i < steps) & ~jnp.all(state.done)

    def body(carry):
        i, state, tokens = carry
        position = state.position + 1
        logits, cache = model(state.token[:, None], positions=position[:, None],
                              segment_ids=jnp.ones((batch, 1), jnp.int32), cache=state.cache)
        state, token = _emit(state.replace(cache=cache, position=position), logits[:, -1], eos_ids)
        return i + 1, state, tokens.at[:, i].set(token)

    _, state, tokens = jax.lax.while_loop(cond, body, (jnp.int32(0), state, tokens))
    return state, tokens


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "buffer_length"))
def _decode(graphdef, state, input_ids, segment_ids, eos_ids, max_new_tokens, seeds, sampling: SamplingParams,
            cache_length: int, buffer_length: int):
    """The whole decode in one program: prefill, then the step loop until done; tokens [batch, buffer]."""
    model: Llama = nnx.merge(graphdef, state)
    decode_state, first = _prefill(model, input_ids, segment_ids, eos_ids, max_new_tokens, seeds, sampling,
                                   cache_length)
    _, rest = _advance(model, decode_state, eos_ids, buffer_length - 1)
    return jnp.concatenate([first[:, None], rest], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length"))
def _prefill_program(graphdef, state, input_ids, segment_ids, eos_ids, max_new_tokens, seeds,
                     sampling: SamplingParams, cache_length: int):
    return _prefill(nnx.merge(graphdef, state), input_ids, segment_ids, eos_ids, max_new_tokens, seeds, sampling,
                    cache_length)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnames=("decode_state",))
def _advance_program(graphdef, state, decode_state: DecodeState, eos_ids, steps: int):
    return _advance(nnx.merge(graphdef, state), decode_state, eos_ids, steps)


@functools.partial(jax.jit, donate_argnames=("decode_state",))
def _stop_rows(decode_state: DecodeState, rows: jax.Array) -> DecodeState:
    return decode_state.replace(done=decode_state.done | rows)


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Host-side arrays of one padded batch and the static shapes it compiles for."""

    input_ids: np.ndarray  # [batch, prompt_length], left-padded
    segment_ids: np.ndarray  # 1 on prompt tokens, 0 on padding
    max_new_tokens: np.ndarray  # [batch] int32 (1 on padding rows, which are done from the start)
    seeds: np.ndarray  # [batch, 2] uint32: each row's seed and stream (its key is fold_in(key(seed), stream))
    sampling: SamplingParams
    cache_length: int
    buffer_length: int


def _pad_batch(prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingConfig], *,
               streams: Sequence[int] | None = None, min_batch: int = 1) -> _Batch:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("decoding needs at least one prompt and no empty prompt")
    if len(samplings) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(samplings)} sampling configs")
    prompt_length = bucket(max(len(p) for p in prompts))
    batch = bucket(max(len(prompts), min_batch), BATCH_BUCKETS)
    input_ids = np.zeros((batch, prompt_length), np.int32)
    segment_ids = np.zeros((batch, prompt_length), np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, prompt_length - len(prompt):] = prompt
        segment_ids[row, prompt_length - len(prompt):] = 1
    rows = [*samplings, *[SamplingConfig(max_new_tokens=1)] * (batch - len(prompts))]
    buffer_length = bucket(max(s.max_new_tokens for s in samplings))
    return _Batch(input_ids=input_ids, segment_ids=segment_ids,
                  max_new_tokens=np.asarray([s.max_new_tokens for s in rows], np.int32),
                  seeds=np.asarray([(s.seed % 2**32, stream) for s, stream in
                                    zip(rows, [*(streams or [0] * len(prompts)), *[0] * (batch - len(prompts))])],
                                   np.uint32),
                  sampling=SamplingParams.of(rows), cache_length=bucket(prompt_length + buffer_length),
                  buffer_length=buffer_length)


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:  # several processes: every one gets all rows
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
    *,
    eos_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (token ids, BOS included by the caller), EOS kept, nothing after it.

    `sampling` is one config for every row (each row then draws its own random stream of the seed) or
    one per prompt (each row draws from its own seed alone, as `decode_chunks` does).
    """
    shared = isinstance(sampling, SamplingConfig)
    samplings = [sampling] * len(prompts) if shared else list(sampling)
    eos_ids = tuple(model.config.eos_token_ids if eos_ids is None else eos_ids)
    padded = _pad_batch(prompts, samplings, streams=range(len(prompts)) if shared else None)
    graphdef, state = nnx.split(model)
    tokens = _decode(graphdef, state, jnp.asarray(padded.input_ids), jnp.asarray(padded.segment_ids),
                     jnp.asarray(eos_ids, jnp.int32), jnp.asarray(padded.max_new_tokens), jnp.asarray(padded.seeds),
                     padded.sampling, padded.cache_length, padded.buffer_length)
    tokens = _to_host(tokens)[: len(prompts)]
    return [[int(t) for t in row if t >= 0] for row in tokens]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What one chunk of decoding added: the new tokens of each row (EOS kept) and which rows are done."""

    tokens: list[list[int]]
    done: list[bool]


def decode_chunks(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[SamplingConfig],
    *,
    eos_ids: Sequence[int] | None = None,
    chunk_tokens: int = 8,
    stop_rows: Callable[[], Sequence[bool]] | None = None,
    min_batch: int = 1,
) -> Iterator[Chunk]:
    """Decodes a batch chunk by chunk: first the prefill's token, then up to `chunk_tokens` per chunk.

    The tokens are those `generate` gives for the same prompts and settings. `stop_rows`, asked
    between chunks, marks rows to stop early (say, a client went away): they emit nothing more, and
    the decode ends as soon as every row is done. `min_batch` pads the batch to at least that many rows
    (done from the start), so that a server compiles one batch shape, not one per batch-size bucket.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    eos = jnp.asarray(tuple(model.config.eos_token_ids if eos_ids is None else eos_ids), jnp.int32)
    padded = _pad_batch(prompts, samplings, min_batch=min_batch)
    graphdef, state = nnx.split(model)
    decode_state, first = _prefill_program(
        graphdef, state, jnp.asarray(padded.input_ids), jnp.asarray(padded.segment_ids), eos,
        jnp.asarray(padded.max_new_tokens), jnp.asarray(padded.seeds), padded.sampling, padded.cache_length)
    tokens = _to_host(first)[:, None]
    n = len(prompts)
    while True:
        done = _to_host(decode_state.done)
        yield Chunk(tokens=[[int(t) for t in row if t >= 0] for row in tokens[:n]], done=done[:n].tolist())
        if stop_rows is not None:
            stop = np.zeros(done.shape, bool)
            stop[:n] = np.asarray(stop_rows(), bool)
            if (stop & ~done).any():
                decode_state = _stop_rows(decode_state, jnp.asarray(stop))
                done = done | stop
        if done.all():
            return
        decode_state, tokens = _advance_program(graphdef, state, decode_state, eos, chunk_tokens)
        tokens = _to_host(tokens)
