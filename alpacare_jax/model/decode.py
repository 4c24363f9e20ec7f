"""Batched autoregressive decoding with a KV cache: prefill once, then one token per step.

Every row's sequence sits at the start of its own cache row (prompts are right-padded, a token's slot
is its rotary position), so rows are independent: results match decoding each prompt alone, and rows
can come and go. Prompt length, batch size and cache length are rounded up to buckets, so a server or
an evaluation run compiles a handful of programs instead of one per prompt length.

Two ways to run the same steps:
* `generate`: the whole decode (prefill plus `lax.while_loop`s over steps that stop when every row has
  emitted EOS) is one jitted program: the fastest way to answer a batch.
* `DecodeSlots`: continuous batching. A fixed number of rows (slots) over one preallocated cache; a new
  prompt is prefilled and written into a free slot between chunks of decoding steps, while the other
  slots keep their place; a finished or stopped slot is free at once. What a server streams from.

A step's attention reads only a window of the cache that holds every row's filled part: `generate`
moves to the next larger window when the rows outgrow one, the slots pick theirs per chunk. Reading a
256-slot cache when 70 are filled was a third of a step's attention traffic for nothing. On CPU each
row reads only its own filled part, whatever the window (`attention.rowwise_cached_attention`): a
server's slots hold prompts of very different lengths.

Nothing about a request is compiled in: the sampling settings (temperature, top-k, top-p), the seed
and `max_new_tokens` are per-row traced values, so rows with different settings share one batch and
new values reuse the compiled programs. Each row draws from its own key, folded with its own step
count, so a sampled answer depends only on its seed, not on its batch neighbours, its slot or the chunking.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from alpacare_jax.model.llama import KVCache, Llama, for_tpu

LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Below this, a temperature decodes greedily (vLLM draws the same line): logits divided by 1e-40 overflow
# float32 to inf, and the limit of sampling as the temperature goes to 0 is the argmax anyway.
MIN_TEMPERATURE = 1e-5


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 (or below MIN_TEMPERATURE) is greedy; top_k 0 and top_p 1.0 disable those filters."""

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
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)


@struct.dataclass
class SamplingParams:
    """The sampling settings of each row as arrays [batch]: traced, so new values compile nothing."""

    temperature: jax.Array  # float32, 0: greedy
    top_p: jax.Array  # float32, 1: no filter
    top_k: jax.Array  # int32, 0: no filter

    @classmethod
    def of(cls, configs: Sequence[SamplingConfig], batch: int | None = None) -> SamplingParams:
        """One row per config, then greedy rows up to `batch` (the batch padding)."""
        pad = [SamplingConfig()] * ((batch or len(configs)) - len(configs))
        rows = [*configs, *pad]
        return cls(temperature=np.asarray([c.temperature for c in rows], np.float32),
                   top_p=np.asarray([c.top_p for c in rows], np.float32),
                   top_k=np.asarray([c.top_k for c in rows], np.int32))


def bucket(n: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(2 ** np.ceil(np.log2(n)))


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys of float32 values, in the values' order (negative floats: every bit flipped; the others:
    the sign bit set), so that a threshold on values can be found by bisecting integers."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)  # -0.0 is 0.0
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key(holds: Callable[[jax.Array], jax.Array], rows: int) -> jax.Array:
    """Per row, the largest uint32 key t for which `holds(t)` [rows] is true, for a condition that holds
    at 0 and, once false, stays false for larger keys: 32 bisection steps find it exactly."""

    def step(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2 + (high - low) % 2  # rounded up, and no overflow
        ok = holds(middle)
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle - 1)

    bounds = (jnp.zeros((rows,), jnp.uint32), jnp.full((rows,), 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, step, bounds)[0]


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Logits [batch, vocab] divided by each row's temperature, with tokens outside its top-k / top-p at -inf.

    top-k keeps the tokens at or above the k-th largest logit; top-p then keeps the fewest most likely of
    those whose probability (renormalised over them) reaches top_p. Both cut-offs are found by bisection
    over the logits' values, a few reductions over the vocabulary each, instead of sorting it (top_k is a
    traced value, so `lax.top_k` would not do): a sort of the vocabulary cost more than the model's step on a
    CPU, and most of the compile time of a TPU decoding program. Ties at a cut-off are all kept.
    """
    vocab, rows = logits.shape[-1], logits.shape[0]
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    logits = logits / temperature
    keys = _order_keys(logits)

    def kth_largest():
        k = jnp.clip(params.top_k, 1, vocab)
        return _largest_key(lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k, rows)

    no_cut = jnp.zeros((rows,), jnp.uint32)
    top_k = params.top_k > 0
    kth = jnp.where(top_k, jax.lax.cond(jnp.any(top_k), kth_largest, lambda: no_cut), 0)
    kept = keys >= kth[:, None]

    def nucleus():
        probs = jax.nn.softmax(jnp.where(kept, logits, -jnp.inf), axis=-1)
        mass = lambda t: jnp.sum(jnp.where(keys >= t[:, None], probs, 0.0), axis=-1)
        return _largest_key(lambda t: mass(t) >= params.top_p, rows)

    top_p = params.top_p < 1.0
    cutoff = jnp.where(top_p, jax.lax.cond(jnp.any(top_p), nucleus, lambda: no_cut), 0)
    return jnp.where(keys >= jnp.maximum(kth, cutoff)[:, None], logits, -jnp.inf)


def sample_next(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig | SamplingParams) -> jax.Array:
    """Next token per row from float32 logits [batch, vocab].

    `rng` is one key (rows draw independently from it) or one key per row. Greedy rows take the argmax;
    the filters and the draw run only when some row samples.
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
    """Everything a decode carries from one step (or chunk) to the next; lives on the device.

    A row's next input token goes to cache slot `cache.lengths[row]`, which is also its rotary position.
    """

    cache: KVCache
    token: jax.Array  # [batch] the last emitted token, the next step's input
    done: jax.Array  # [batch] bool: EOS emitted, max_new_tokens reached, stopped, or no request
    steps: jax.Array  # [batch] int32: tokens emitted so far by each row
    keys: jax.Array  # [batch] each row's base key; its n-th token draws with fold_in(key, n)
    max_new_tokens: jax.Array  # [batch] int32
    sampling: SamplingParams


@struct.dataclass
class RowSettings:
    """What a row brings with its prompt: device arrays [rows] (one per prompt of a prefill)."""

    max_new_tokens: jax.Array  # int32
    seeds: jax.Array  # [rows, 2] uint32: each row's seed and stream; its key is fold_in(key(seed), stream)
    sampling: SamplingParams

    @classmethod
    def of(cls, samplings: Sequence[SamplingConfig], streams: Sequence[int], rows: int) -> RowSettings:
        """The settings of `samplings`, padded to `rows` with one-token greedy rows."""
        padded = [*samplings, *[SamplingConfig(max_new_tokens=1)] * (rows - len(samplings))]
        streams = [*streams, *[0] * (rows - len(samplings))]
        return cls(max_new_tokens=np.asarray([s.max_new_tokens for s in padded], np.int32),
                   seeds=np.asarray([(s.seed % 2**32, stream) for s, stream in zip(padded, streams)], np.uint32),
                   sampling=SamplingParams.of(padded))


def _row_key(seed_and_stream: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed_and_stream[0]), seed_and_stream[1])


LayerWeights = list | None  # each layer's parameters in arrays of their own (CPU), or None: the stacked ones


def step_layer_weights(model: Llama) -> LayerWeights:
    """What decoding steps read the layers' weights from: on CPU, copies sliced out of the stacked arrays
    (see `Llama.unstacked_layers`: without them XLA copied every weight in every step, two thirds of a
    step of the benchmark's model); on TPU, the stacked arrays themselves."""
    return None if for_tpu(model.config) else model.unstacked_layers()


def _emit(state: DecodeState, logits: jax.Array, eos_ids: jax.Array) -> tuple[DecodeState, jax.Array]:
    """Samples the next token of every row from its logits [batch, vocab]; rows already done emit -1."""
    step_keys = jax.vmap(jax.random.fold_in)(state.keys, state.steps)
    token = sample_next(logits, step_keys, state.sampling)
    emitted = jnp.where(state.done, -1, token)
    steps = state.steps + (~state.done).astype(jnp.int32)
    done = state.done | jnp.isin(token, eos_ids) | (steps >= state.max_new_tokens)
    return state.replace(token=jnp.where(state.done, state.token, token), done=done, steps=steps), emitted


def _first_tokens(model: Llama, hidden: jax.Array, cache: KVCache, last: jax.Array, settings: RowSettings,
                  eos_ids: jax.Array) -> tuple[DecodeState, jax.Array]:
    """The decode state of freshly prefilled rows and their first tokens, sampled from `hidden` [rows, embed]
    (each prompt's last token); rows without a prompt (`last` -1) are done from the start."""
    rows = last.shape[0]
    state = DecodeState(cache=cache, token=jnp.zeros((rows,), jnp.int32), done=last < 0,
                        steps=jnp.zeros((rows,), jnp.int32), keys=jax.vmap(_row_key)(settings.seeds),
                        max_new_tokens=settings.max_new_tokens, sampling=settings.sampling)
    return _emit(state, model.logits(hidden), eos_ids)


def _prefill(model: Llama, input_ids, segment_ids, settings: RowSettings, eos_ids,
             cache_length: int) -> tuple[DecodeState, jax.Array]:
    """Runs right-padded prompts through the model into a cache of `cache_length` slots; emits their
    first tokens [batch]."""
    hidden, cache = model.prefill(input_ids, segment_ids=segment_ids)
    last = cache.lengths - 1
    hidden = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]
    return _first_tokens(model, hidden, cache.padded(cache_length), last, settings, eos_ids)


def _step(model: Llama, state: DecodeState, eos_ids: jax.Array, window: int,
          layer_weights: LayerWeights) -> tuple[DecodeState, jax.Array]:
    """One token for every row: its last token through the model (done rows are written but not counted)."""
    active = (~state.done).astype(jnp.int32)[:, None]
    hidden, cache = model.hidden_states(state.token[:, None], segment_ids=active, cache=state.cache,
                                        kv_window=window, layer_weights=layer_weights)
    return _emit(state.replace(cache=cache), model.logits(hidden[:, 0]), eos_ids)


def _advance(model: Llama, state: DecodeState, eos_ids, tokens: jax.Array, start: jax.Array, window: int,
             layer_weights: LayerWeights) -> tuple[DecodeState, jax.Array, jax.Array]:
    """Steps while columns of `tokens` [batch, n] are left from `start`, some row is not done and every
    row's next slot is inside `window`; each step's tokens (-1 where done) go to the next column.
    Returns the state, the tokens and the next free column."""

    def cond(carry):
        i, state, _ = carry
        fits = jnp.all(state.done | (state.cache.lengths < window))
        return (i < tokens.shape[1]) & ~jnp.all(state.done) & fits

    def body(carry):
        i, state, tokens = carry
        state, token = _step(model, state, eos_ids, window, layer_weights)
        return i + 1, state, jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)

    i, state, tokens = jax.lax.while_loop(cond, body, (start, state, tokens))
    return state, tokens, i


def windows(filled: int, cache_length: int) -> list[int]:
    """The attention windows a decode grows through once `filled` slots of each row may be in use:
    the length buckets above it, up to the whole cache."""
    return [w for w in LENGTH_BUCKETS if filled < w < cache_length] + [cache_length]


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length", "buffer_length"))
def _decode(graphdef, params, input_ids, segment_ids, settings: RowSettings, eos_ids, cache_length: int,
            buffer_length: int):
    """The whole decode in one program: prefill, then a step loop per attention window; tokens [batch, buffer]."""
    model: Llama = nnx.merge(graphdef, params)
    state, first = _prefill(model, input_ids, segment_ids, settings, eos_ids, cache_length)
    tokens = jnp.full((input_ids.shape[0], buffer_length), -1, jnp.int32).at[:, 0].set(first)
    column = jnp.int32(1)
    layer_weights = step_layer_weights(model)  # sliced once, before the step loops
    for window in windows(input_ids.shape[1], cache_length):
        state, tokens, column = _advance(model, state, eos_ids, tokens, column, window, layer_weights)
    return tokens


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Host-side arrays of one padded batch and the static shapes it compiles for."""

    input_ids: np.ndarray  # [batch, prompt_length], right-padded
    segment_ids: np.ndarray  # 1 on prompt tokens, 0 on padding
    settings: RowSettings
    cache_length: int
    buffer_length: int


def _pad_batch(prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingConfig], *,
               streams: Sequence[int] | None = None) -> _Batch:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("decoding needs at least one prompt and no empty prompt")
    if len(samplings) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(samplings)} sampling configs")
    prompt_length = bucket(max(len(p) for p in prompts))
    batch = bucket(len(prompts), BATCH_BUCKETS)
    input_ids = np.zeros((batch, prompt_length), np.int32)
    segment_ids = np.zeros((batch, prompt_length), np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = prompt
        segment_ids[row, : len(prompt)] = 1
    buffer_length = bucket(max(s.max_new_tokens for s in samplings))
    return _Batch(input_ids=input_ids, segment_ids=segment_ids,
                  settings=RowSettings.of(samplings, streams or [0] * len(prompts), batch),
                  cache_length=bucket(prompt_length + buffer_length), buffer_length=buffer_length)


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
    one per prompt (each row draws from its own seed alone, as `DecodeSlots` does).
    """
    shared = isinstance(sampling, SamplingConfig)
    samplings = [sampling] * len(prompts) if shared else list(sampling)
    eos_ids = tuple(model.config.eos_token_ids if eos_ids is None else eos_ids)
    padded = _pad_batch(prompts, samplings, streams=range(len(prompts)) if shared else None)
    graphdef, params = nnx.split(model)
    tokens = _decode(graphdef, params, padded.input_ids, padded.segment_ids, padded.settings,
                     np.asarray(eos_ids, np.int32), padded.cache_length, padded.buffer_length)
    tokens = _to_host(tokens)[: len(prompts)]
    return [[int(t) for t in row if t >= 0] for row in tokens]


# ---- continuous batching ----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "num_slots", "max_length"))
def _empty_slots(config, num_slots: int, max_length: int) -> DecodeState:
    settings = RowSettings.of([], [], num_slots)
    return DecodeState(cache=KVCache.empty(config, num_slots, max_length), token=jnp.zeros((num_slots,), jnp.int32),
                       done=jnp.ones((num_slots,), bool), steps=jnp.zeros((num_slots,), jnp.int32),
                       keys=jax.vmap(_row_key)(settings.seeds), max_new_tokens=settings.max_new_tokens,
                       sampling=settings.sampling)


def _placed_like(tree, params):
    """`tree` committed to the devices that hold `params` (whole on each): a program's outputs are
    committed, and a state that was not at first would compile each program once more."""
    sharding = jax.tree.leaves(params)[0].sharding
    if len(sharding.device_set) == 1:
        return jax.device_put(tree, next(iter(sharding.device_set)))
    return jax.device_put(tree, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _insert_program(graphdef, params, state: DecodeState, input_ids, segment_ids, positions, starts, lengths,
                    slots, settings: RowSettings, eos_ids):
    """Prefills prompts packed into one row [1, T] (`segment_ids` 1, 2, ... per prompt, `starts` and
    `lengths` [rows] where each sits) and writes prompt r into cache row `slots[r]` (slot ids past the
    end mark unused rows). Returns the state and each prompt's first token [rows]."""
    model: Llama = nnx.merge(graphdef, params)
    hidden, packed = model.prefill(input_ids, positions=positions, segment_ids=segment_ids)
    last = jnp.where(lengths > 0, starts + lengths - 1, -1)
    fresh, first = _first_tokens(model, hidden[0, jnp.maximum(last, 0)], state.cache, last, settings, eos_ids)
    width = input_ids.shape[1]
    # Each prompt's keys are copied from its place in the packed row to the start of its cache row, one
    # prompt at a time, in place: a gather of all of them at once would hold rows x T slots per layer.
    # Padded to twice the width, so a slice of `width` slots starting at any prompt stays inside it.
    pad = [(0, 0)] * 5
    pad[packed.slot_axis] = (0, width)
    doubled = [jnp.pad(t, pad) for t in (packed.k, packed.v)]
    cache = _write_rows(state.cache, doubled, jnp.sum(lengths > 0), slots, lengths,
                        lambda source, r: jax.lax.dynamic_slice_in_dim(source, starts[r], width, packed.slot_axis))
    return _placed_rows(state, fresh, slots).replace(cache=cache), first


def _write_rows(cache: KVCache, sources: Sequence[jax.Array], count: jax.Array, slots: jax.Array,
                lengths: jax.Array, part: Callable[[jax.Array, jax.Array], jax.Array]) -> KVCache:
    """`cache` with prompts 0 .. count - 1 written into rows `slots[r]` (lengths `lengths[r]`), one prompt at a
    time, in place: `part(source, r)` is prompt r's [layers, 1, ...] block of `sources` (keys, values),
    from its first slot on."""

    def write(r, cache: KVCache) -> KVCache:
        def one(buffer, source):
            return jax.lax.dynamic_update_slice(buffer, part(source, r).astype(buffer.dtype), (0, slots[r], 0, 0, 0))

        return cache.replace(k=one(cache.k, sources[0]), v=one(cache.v, sources[1]),
                             lengths=cache.lengths.at[slots[r]].set(lengths[r]))

    return jax.lax.fori_loop(0, count, write, cache)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def prefill_cache(graphdef, params, input_ids, segment_ids) -> KVCache:
    """The KV cache of right-padded prompts [rows, P] (a prefix that other sequences continue)."""
    _, cache = nnx.merge(graphdef, params).prefill(input_ids, segment_ids=segment_ids)
    return cache


@functools.partial(jax.jit, static_argnames=("graphdef", "width"), donate_argnames=("state",))
def _insert_after_prefix_program(graphdef, params, state: DecodeState, prefix: KVCache, input_ids, segment_ids,
                                 slots, settings: RowSettings, eos_ids, width: int):
    """Prefills prompts that begin with a cached prefix (one row): rows [n, L] hold what follows it
    (right-padded, `segment_ids` 1 on real tokens, rows of none unused) and continue copies of its cache;
    row r, its first `width` slots, is then written into cache row `slots[r]`. Returns the state and each
    row's first token."""
    model: Llama = nnx.merge(graphdef, params)
    rows = input_ids.shape[0]
    rest = prefix.repeated(rows).padded(prefix.max_length + input_ids.shape[1])
    hidden, rest = model.hidden_states(input_ids, segment_ids=segment_ids, cache=rest)
    counts = jnp.sum(segment_ids > 0, axis=1)
    last = jnp.where(counts > 0, counts - 1, -1)
    fresh, first = _first_tokens(model, hidden[jnp.arange(rows), jnp.maximum(last, 0)], state.cache, last,
                                 settings, eos_ids)
    parts = [jax.lax.slice_in_dim(t, 0, width, axis=rest.slot_axis) for t in (rest.k, rest.v)]
    cache = _write_rows(state.cache, parts, jnp.sum(counts > 0), slots, rest.lengths,
                        lambda source, r: jax.lax.dynamic_slice_in_dim(source, r, 1, axis=1))
    return _placed_rows(state, fresh, slots).replace(cache=cache), first


def _placed_rows(state: DecodeState, fresh: DecodeState, slots: jax.Array) -> DecodeState:
    """`state` with the fresh rows' settings and first tokens (not their cache) at `slots` (past the end:
    dropped); the caller sets the cache."""
    return jax.tree.map(lambda old, new: old.at[slots].set(new, mode="drop"), state.replace(cache=None),
                        fresh.replace(cache=None))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "window"), donate_argnames=("state",))
def _advance_program(graphdef, params, state: DecodeState, eos_ids, steps: int, window: int,
                     layer_weights: LayerWeights = None):
    """Up to `steps` steps of every busy row; `layer_weights` as `step_layer_weights` gives them (None:
    derived from `params` in this program)."""
    model: Llama = nnx.merge(graphdef, params)
    tokens = jnp.full((state.token.shape[0], steps), -1, jnp.int32)
    state, tokens, _ = _advance(model, state, eos_ids, tokens, jnp.int32(0), window,
                                step_layer_weights(model) if layer_weights is None else layer_weights)
    return state, tokens


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_weights_program(graphdef, params) -> LayerWeights:
    return step_layer_weights(nnx.merge(graphdef, params))


@functools.partial(jax.jit, donate_argnames=("state",))
def _stop_rows(state: DecodeState, rows: jax.Array) -> DecodeState:
    return state.replace(done=state.done | rows)


@dataclasses.dataclass(frozen=True)
class SlotRequest:
    """A prompt to decode in a slot (token ids, BOS included by the caller)."""

    slot: int
    prompt: Sequence[int]
    sampling: SamplingConfig


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Prompt tokens that several requests begin with (a few-shot primer), prefilled once by
    `DecodeSlots.prefill_prefix`: `insert(..., prefix=)` then runs only what follows it."""

    tokens: tuple[int, ...]
    cache: KVCache  # one row


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What one chunk of decoding steps added: each slot's new tokens (EOS kept) and which slots are done."""

    tokens: list[list[int]]
    done: list[bool]


class DecodeSlots:
    """`num_slots` rows decoding side by side over one preallocated cache of `max_length` slots per row.

    `insert` prefills new prompts (packed into one row of at most `prefill_tokens` tokens, unless one
    prompt alone is longer) and writes them into free slots, without disturbing the others; `advance`
    runs up to `chunk_tokens` steps of every busy slot; `stop` ends slots early (a client went away, a
    stop string was found). A slot whose row is done is free for the next `insert`. Each slot has its
    own sampling settings, seed and `max_new_tokens`, and gets the tokens `generate` gives its prompt
    alone with the same settings (per prompt, as `generate` with one config per prompt).

    Prompts that begin with the same tokens (an evaluation task's few-shot primer) can skip them: `prefill_prefix`
    runs them once, and `insert(requests, prefix)` runs only what follows them in each slot.

    Programs: one prefill per packed length bucket and one chunk of steps per attention window, none
    depending on how many slots are busy or on any request's settings; `warm_up` compiles them all (not the
    prefix programs, which depend on the prefix's length).
    """

    def __init__(self, model: Llama, *, num_slots: int, max_length: int, eos_ids: Sequence[int],
                 chunk_tokens: int = 8, prefill_tokens: int = 512):
        if chunk_tokens < 1 or num_slots < 1:
            raise ValueError(f"chunk_tokens and num_slots must be >= 1, got {chunk_tokens} and {num_slots}")
        self.num_slots, self.max_length, self.chunk_tokens = num_slots, max_length, chunk_tokens
        self.prefill_tokens = min(bucket(prefill_tokens), max_length)
        self._graphdef, self._params = nnx.split(model)
        # On CPU the decoding steps read each layer's weights from copies of their own, made once here
        # (see `step_layer_weights`; made in `_advance_program`, they would be copied again every chunk):
        # the layers' weights are then held twice in host memory. None on TPU.
        self._layer_weights = _layer_weights_program(self._graphdef, self._params)
        self._eos = np.asarray(tuple(eos_ids), np.int32)
        self._config = model.config
        self.reset()

    def reset(self) -> None:
        """Every slot free, the cache blank (after a failed program, whose donated state is gone)."""
        self._state = _placed_like(_empty_slots(self._config, self.num_slots, self.max_length), self._params)
        self._lengths = np.zeros(self.num_slots, np.int64)  # host copy: picks each chunk's attention window
        self.done = np.ones(self.num_slots, bool)

    def free_slots(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(self.done)]

    def fits(self, prompts: Sequence[Sequence[int]], prefix: Prefix | None = None) -> bool:
        """Whether these prompts (all beginning with `prefix`, if given) can share one prefill."""
        if len(prompts) <= 1:
            return True
        if prefix is None:
            return sum(map(len, prompts)) <= self.prefill_tokens
        rows, longest = bucket(len(prompts), BATCH_BUCKETS), max(len(p) for p in prompts) - len(prefix.tokens)
        return rows * bucket(longest) <= self.prefill_tokens

    def prefill_prefix(self, tokens: Sequence[int]) -> Prefix:
        """`tokens` prefilled once, for `insert` to continue in every slot whose prompt begins with them."""
        if not 0 < len(tokens) < self.max_length:
            raise ValueError(f"a prefix of {len(tokens)} tokens for slots of {self.max_length}")
        ids, segments = (np.zeros((1, min(bucket(len(tokens)), self.max_length)), np.int32) for _ in range(2))
        ids[0, :len(tokens)], segments[0, :len(tokens)] = tokens, 1
        return Prefix(tuple(tokens), prefill_cache(self._graphdef, self._params, ids, segments))

    def insert(self, requests: Sequence[SlotRequest], prefix: Prefix | None = None) -> list[int]:
        """Prefills `requests` into their (free) slots; returns each one's first token. With `prefix`, every
        prompt begins with its tokens and is longer, and only what follows them is run."""
        if not requests or not self.fits([r.prompt for r in requests], prefix) or len(requests) > self.num_slots:
            raise ValueError(f"{len(requests)} prompts cannot share one prefill")
        for r in requests:
            if not 0 < len(r.prompt) < self.max_length or not self.done[r.slot]:
                raise ValueError(f"slot {r.slot}: a prompt of {len(r.prompt)} tokens into a "
                                 f"{'busy' if not self.done[r.slot] else 'free'} slot of {self.max_length}")
            if prefix is not None and (len(r.prompt) <= len(prefix.tokens)
                                       or tuple(r.prompt[:len(prefix.tokens)]) != prefix.tokens):
                raise ValueError(f"slot {r.slot}: its prompt does not continue the {len(prefix.tokens)}-token prefix")
        if prefix is None:
            first = self._insert_packed(requests)
        else:
            first = self._insert_after(requests, prefix)
        first = _to_host(first)
        for r, token in zip(requests, first):
            self._lengths[r.slot] = len(r.prompt)
            self.done[r.slot] = token in self._eos or r.sampling.max_new_tokens == 1
        return [int(t) for t in first[: len(requests)]]

    def _insert_packed(self, requests: Sequence[SlotRequest]) -> jax.Array:
        """Whole prompts packed into one row of the prefill."""
        width = min(bucket(sum(len(r.prompt) for r in requests)), self.max_length)
        packed = _Packed.of([r.prompt for r in requests], width, self.num_slots)
        slots = np.full(self.num_slots, self.num_slots, np.int32)  # past the end: unused rows
        slots[: len(requests)] = [r.slot for r in requests]
        settings = RowSettings.of([r.sampling for r in requests], [0] * len(requests), self.num_slots)
        self._state, first = _insert_program(self._graphdef, self._params, self._state, packed.input_ids,
                                             packed.segment_ids, packed.positions, packed.starts, packed.lengths,
                                             slots, settings, self._eos)
        return first

    def _insert_after(self, requests: Sequence[SlotRequest], prefix: Prefix) -> jax.Array:
        """A row per prompt holding what follows the prefix, the prefix's cache copied under each."""
        rests = [r.prompt[len(prefix.tokens):] for r in requests]
        rows = bucket(len(requests), BATCH_BUCKETS)
        input_ids, segment_ids = (np.zeros((rows, bucket(max(map(len, rests)))), np.int32) for _ in range(2))
        for row, rest in enumerate(rests):
            input_ids[row, :len(rest)], segment_ids[row, :len(rest)] = rest, 1
        slots = np.full(rows, self.num_slots, np.int32)  # past the end: unused rows
        slots[: len(requests)] = [r.slot for r in requests]
        settings = RowSettings.of([r.sampling for r in requests], [0] * len(requests), rows)
        width = min(prefix.cache.max_length + input_ids.shape[1], self.max_length)  # every prompt fits in it
        self._state, first = _insert_after_prefix_program(self._graphdef, self._params, self._state, prefix.cache,
                                                          input_ids, segment_ids, slots, settings, self._eos,
                                                          width=width)
        return first

    def advance(self) -> Chunk:
        """Up to `chunk_tokens` more tokens of every busy slot (none when all are free)."""
        filled = int(self._lengths[~self.done].max(initial=0))
        window = min(bucket(filled + self.chunk_tokens), self.max_length)
        self._state, tokens = _advance_program(self._graphdef, self._params, self._state, self._eos,
                                               self.chunk_tokens, window, self._layer_weights)
        tokens, done, lengths = (_to_host(x) for x in (tokens, self._state.done, self._state.cache.lengths))
        self.done, self._lengths = done.copy(), lengths.astype(np.int64)
        return Chunk(tokens=[[int(t) for t in row if t >= 0] for row in tokens], done=done.tolist())

    def stop(self, slots: Sequence[int]) -> None:
        """Ends these slots' decoding now: they emit nothing more and are free."""
        rows = np.zeros(self.num_slots, bool)
        rows[list(slots)] = True
        if (rows & ~self.done).any():
            self._state = _stop_rows(self._state, rows)
            self.done |= rows

    def warm_up(self) -> None:
        """Compiles every program serving can need (each prefill width, each window) on idle slots.

        Twice over: programs are compiled per layout of their inputs, and with a model split over several
        devices the state a program returns may be laid out unlike the one it was given at first.
        """
        if not self.done.all():
            raise RuntimeError("warm_up needs every slot free")
        no_rows = np.full(self.num_slots, self.num_slots, np.int32)
        settings = RowSettings.of([], [], self.num_slots)
        for _ in range(2):
            for width in windows(0, self.max_length):
                packed = _Packed.of([], width, self.num_slots)
                self._state, _ = _insert_program(self._graphdef, self._params, self._state, packed.input_ids,
                                                 packed.segment_ids, packed.positions, packed.starts,
                                                 packed.lengths, no_rows, settings, self._eos)
            for window in windows(0, self.max_length):
                self._state, _ = _advance_program(self._graphdef, self._params, self._state, self._eos,
                                                  self.chunk_tokens, window, self._layer_weights)
        jax.block_until_ready(self._state)


@dataclasses.dataclass(frozen=True)
class _Packed:
    """Prompts packed one after another into one row of `width` tokens, and where each one sits."""

    input_ids: np.ndarray  # [1, width]
    segment_ids: np.ndarray  # [1, width]: prompt r is segment r + 1, padding 0
    positions: np.ndarray  # [1, width]: restarting at 0 per prompt
    starts: np.ndarray  # [rows]
    lengths: np.ndarray  # [rows]: 0 for unused rows

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], width: int, rows: int) -> _Packed:
        input_ids, segment_ids, positions = (np.zeros((1, width), np.int32) for _ in range(3))
        starts, lengths = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        offset = 0
        for r, prompt in enumerate(prompts):
            n = len(prompt)
            input_ids[0, offset:offset + n] = prompt
            segment_ids[0, offset:offset + n] = r + 1
            positions[0, offset:offset + n] = np.arange(n)
            starts[r], lengths[r] = offset, n
            offset += n
        return cls(input_ids, segment_ids, positions, starts, lengths)
