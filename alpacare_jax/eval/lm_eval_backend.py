"""The lm-evaluation-harness model backend `alpacare_jax`: the harness's tasks scored by our JAX model.

    alpacare-eval lm_eval run --model alpacare_jax --model_args model=HF_DIR_OR_WORKDIR --tasks pubmedqa

It loads a model the way every other command does (`loading.load_model`: an HF directory or a training
workdir) onto a mesh from `fsdp` / `tensor` / `data` model args, and answers the harness's three request
types so that results equal the harness's own `hf` backend on the HF export of the same weights:

- `loglikelihood`: the harness's tokenisation rules (`TemplateLM._encode_pair`: BOS, trailing spaces of
  the context moved into the continuation), contexts truncated from the left at the model's length,
  requests sorted longest first. Two ways to spend no compute twice:
  * a context whose continuations have several tokens (the option texts of MedQA, MedMCQA, TruthfulQA)
    runs once: its keys and values are cached and every continuation is scored against that cache;
  * every other request is one sequence, (context + continuation)[:-1]; requests whose sequence is the
    same (one-token answers " A" .. " D", " yes" / " no") share it, the candidates read at its last
    position. Rows are as long as their longest sequence (or `pack_length`); shorter sequences are
    packed into the room it leaves (attention stays within each).
  * a prefix that many requests begin with (a task's instruction and few-shot examples: TruthfulQA's
    six-question primer is 245 of its 256 context tokens) runs once into a KV cache, and every request
    of the group runs only what follows it, against that cache.
  Only the scored positions are projected onto the vocabulary, a chunk at a time: never [batch, length,
  vocab] logits.
- `loglikelihood_rolling`: the harness's disjoint rolling windows, scored as sequences.
- `generate_until`: continuous batching on the KV-cache decoder (`model.decode.DecodeSlots`): a row that
  emits a stop string or EOS is stopped at once and its slot takes the next prompt; the text is cut at the
  stop string as the harness does; `max_gen_toks` from the task or the model args. Prompts that begin
  with the same few-shot primer (BBH's three worked examples) are grouped as for log-likelihoods: the
  primer is prefilled once and each slot runs only what follows it. On several processes
  (whose devices the slots' state does not span yet), one `model.generate` program per batch instead.

Shapes are rounded up to a few steps (`LENGTH_STEPS`, powers of two for counts), so a whole evaluation
compiles a handful of programs.

Multi-host (a TPU pod): every process runs the same command with the same requests; the batch is one
global array over all chips and every process gets all results back. The harness is told it runs in one
"rank" (it must not split the requests) and, as under tensor-parallel launchers, only the process whose
LOCAL_RANK is 0 writes results.

The harness's own `lm_eval` command cannot find this backend: lm_eval 0.4.13 resolves `--model` only in
its registry, which it fills from its own module list (`lm_eval.models.MODEL_MAPPING`); it reads no
entry points, and `--include_path` only indexes task YAML (its `!function` modules are imported when a
task is built, after `--model` was looked up). `alpacare-eval lm_eval ...` is that same command line
with this module imported first.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from alpacare_jax import sharding
from alpacare_jax.infer.loading import LoadedModel, load_model
from alpacare_jax.model import KVCache, SamplingConfig, generate
from alpacare_jax.model.decode import BATCH_BUCKETS, DecodeSlots, Prefix, SlotRequest, bucket, prefill_cache

BACKEND_NAME = "alpacare_jax"
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for its `hf` backend
DEFAULT_BATCH_SIZE = 16
# Lengths are rounded up to these: steps of 16 up to 128 (short prompts are the common case), then about
# 1.5x apart. Few compiled shapes, little padding.
LENGTH_STEPS = (16, 32, 48, 64, 80, 96, 112, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
                8192)
# Packed rows are at least this long. 0: as long as their longest sequence (shorter ones fill what it leaves),
# fastest on CPU, where a longer row's attention costs more than the padding it saves (BENCHMARKS.md).
DEFAULT_PACK_LENGTH = 0
PROJECT_CHUNK = 64  # scored positions per row projected onto the vocabulary at once
# A prefix is run once for the requests that share it when it is at least this long and what it saves (its
# tokens once per member but one) is at least PREFIX_GAIN of what the members still run after it: rows after a
# prefix hold one request each, so they give up the packing that leaves no padding.
MIN_PREFIX = 16
PREFIX_GAIN = 0.25
CHUNK_TOKENS = 8  # decoding steps between two looks for stop strings


def _project(model, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(target) and the most likely token at each of hidden [B, S, E], PROJECT_CHUNK positions at a time.

    S is a power of two (`_power_of_two`), so the chunks divide it.
    """
    batch, slots = targets.shape
    chunk = min(slots, PROJECT_CHUNK)

    def one(part):
        h, t = part
        logits = model.logits(h)  # [B, chunk, vocab] float32
        target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)

    split = lambda x: jnp.moveaxis(x.reshape(batch, slots // chunk, chunk, *x.shape[2:]), 1, 0)
    logprobs, greedy = jax.lax.map(one, (split(hidden), split(targets)))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, slots)
    return merge(logprobs), merge(greedy)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_packed(graphdef, state, input_ids, positions, segment_ids, slot_positions, slot_targets):
    """Packed rows [B, L] (segments 1, 2, ..., positions restarting per segment): at each scored slot
    [B, S], log p(target) and the most likely token."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(input_ids, positions=positions, segment_ids=segment_ids)
    hidden = jnp.take_along_axis(hidden, slot_positions[..., None], axis=1)
    return _project(model, hidden, slot_targets)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_shared(graphdef, state, prefix: KVCache | None, context_ids, context_segments, first_targets, rest_ids,
                  rest_segments, rest_targets):
    """Contexts [G, L] (right-padded; with a cached `prefix`, what follows it) run once into a KV cache;
    continuation j of each context is scored against that cache in pass j.

    first_targets [G, W]: each continuation's first token, read at the context's last position.
    rest_ids / rest_segments / rest_targets [W, G, K]: continuation j without its last token, 1 on its
    tokens, and the tokens they predict. Returns (log p, greedy token) of the first tokens [G, W], and
    of the rest [W, G, K].
    """
    model = nnx.merge(graphdef, state)
    room = context_ids.shape[1] + rest_ids.shape[2]
    if prefix is None:
        hidden, cache = model.prefill(context_ids, segment_ids=context_segments)
        cache = cache.padded(room)
    else:
        cache = prefix.repeated(context_ids.shape[0]).padded(prefix.max_length + room)
        hidden, cache = model.hidden_states(context_ids, segment_ids=context_segments, cache=cache)
    ends = jnp.maximum(jnp.sum(context_segments > 0, axis=1) - 1, 0)
    last = jnp.take_along_axis(hidden, ends[:, None, None], axis=1)[:, 0]
    logits = model.logits(last)  # [G, vocab]
    first = (jnp.take_along_axis(logits, first_targets, axis=-1) - jax.nn.logsumexp(logits, axis=-1)[:, None],
             jnp.argmax(logits, axis=-1).astype(jnp.int32))

    def one(part):
        ids, segments, targets = part
        rest_hidden, _ = model.hidden_states(ids, segment_ids=segments, cache=cache)
        return _project(model, rest_hidden, targets)

    return first, jax.lax.map(one, (rest_ids, rest_segments, rest_targets))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_after_prefix(graphdef, state, prefix: KVCache, input_ids, segment_ids, slot_positions, slot_targets):
    """Rows [B, L] that continue the cached `prefix` (one sequence each, right-padded): at each scored slot
    [B, S], log p(target) and the most likely token."""
    model = nnx.merge(graphdef, state)
    cache = prefix.repeated(input_ids.shape[0]).padded(prefix.max_length + input_ids.shape[1])
    hidden, _ = model.hidden_states(input_ids, segment_ids=segment_ids, cache=cache)
    hidden = jnp.take_along_axis(hidden, slot_positions[..., None], axis=1)
    return _project(model, hidden, slot_targets)


@dataclasses.dataclass(eq=False)
class _Sequence:
    """One model input, (context + continuation)[:-1], shared by every request whose input it is.

    The last `span` positions are scored: each but the last against the next input token (the
    continuations' inner tokens), the last against every candidate (the continuations' last tokens).
    """

    tokens: tuple[int, ...]
    candidates: list[int] = dataclasses.field(default_factory=list)
    span: int = 1

    def slots(self) -> list[tuple[int, int]]:
        """(position, target token) of each scored slot: the inner positions, then one per candidate."""
        n = len(self.tokens)
        inner = [(p, self.tokens[p + 1]) for p in range(n - self.span, n - 1)]
        return inner + [(n - 1, c) for c in self.candidates]


@dataclasses.dataclass(eq=False)
class _SharedContext:
    """A context scored once for several continuations of more than one token."""

    tokens: tuple[int, ...]
    continuations: list[tuple[int, ...]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Scores:
    """log p and greedy flags of one structure's scored tokens, in its own order."""

    logprobs: np.ndarray
    greedy: np.ndarray


def _pack(sequences: Sequence[_Sequence], rows: int, pack_length: int) -> Iterator[tuple[int, list[list[_Sequence]]]]:
    """Forwards of `rows` rows each, as (row length, the sequences of each row), longest sequences first.

    First fit: a sequence goes into the first row with room; when none has room, the forward is full.
    """
    ordered = sorted(sequences, key=lambda s: (-len(s.tokens), s.tokens))
    begin = 0
    while begin < len(ordered):
        length = bucket(max(pack_length, len(ordered[begin].tokens)), LENGTH_STEPS)
        packed: list[list[_Sequence]] = [[] for _ in range(rows)]
        free = [length] * rows
        while begin < len(ordered):
            n = len(ordered[begin].tokens)
            row = next((r for r in range(rows) if free[r] >= n), None)
            if row is None:
                break
            packed[row].append(ordered[begin])
            free[row] -= n
            begin += 1
        yield length, [r for r in packed if r]


@dataclasses.dataclass(frozen=True)
class _GenerationJob:
    """What one generate_until request decodes: its prompt, its sampling settings and where it stops."""

    prompt: list[int]
    sampling: SamplingConfig
    until: list[str]

    @property
    def tokens(self) -> tuple[int, ...]:  # what `_prefix_groups` groups by
        return tuple(self.prompt)


def _worth_sharing(context: int, continuations: Sequence[int], max_length: int) -> bool:
    """Whether a context is better run once for all its continuations than once per continuation.

    Not when every continuation is one token (they already share one sequence), nor when the context
    computed again is less than the continuations themselves (a rolling window's one-token context), nor
    when a continuation would need the context truncated.
    """
    return (max(continuations) > 1 and (len(continuations) - 1) * context > sum(continuations)
            and context + max(continuations) <= max_length + 1)


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def _prefix_groups(items: Sequence, limit) -> list[tuple[tuple[int, ...], list]]:
    """`items` (each with its `tokens`) as (shared prefix, members) where a prefix cache pays (MIN_PREFIX,
    PREFIX_GAIN), then ((), every other item). `limit(item)`: the longest prefix it can share (what it
    scores must come after the prefix).

    Sorted, the items that share a prefix are neighbours, and a run's common prefix is the least of its
    neighbours' common prefixes: a run grows while that stays at least MIN_PREFIX long.
    """
    ordered = sorted(items, key=lambda item: item.tokens)
    groups, rest = [], []
    begin = 0
    while begin < len(ordered):
        end, length = begin + 1, limit(ordered[begin])
        while end < len(ordered):
            common = min(length, limit(ordered[end]), _common_length(ordered[end - 1].tokens, ordered[end].tokens))
            if common < MIN_PREFIX:
                break
            end, length = end + 1, common
        members = ordered[begin:end]
        after = sum(len(m.tokens) - length for m in members)
        if len(members) > 1 and length >= MIN_PREFIX and length * (len(members) - 1) >= PREFIX_GAIN * after:
            groups.append((ordered[begin].tokens[:length], members))
        else:
            rest.extend(members)
        begin = end
    return groups + ([((), rest)] if rest else [])


def _power_of_two(n: int) -> int:
    """The counts of scored slots, continuations and their tokens are rounded up to powers of two."""
    return bucket(n, BATCH_BUCKETS)


def _offsets(row: Sequence[_Sequence]) -> list[tuple[_Sequence, int]]:
    """Each sequence of a packed row with the position it starts at."""
    starts = np.cumsum([0, *(len(s.tokens) for s in row)])
    return list(zip(row, starts.tolist()))


def _global_array(host: np.ndarray, mesh: Mesh, names: Sequence[str | None]) -> jax.Array:
    """`host` (the same on every process) as one array laid out over the mesh by its logical axis names."""
    named = sharding.logical_sharding(mesh, names)
    return jax.make_array_from_callback(host.shape, named, lambda index: host[index])


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:  # several processes: every one gets all rows
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


@register_model(BACKEND_NAME)
class AlpacareJaxLM(TemplateLM):
    """lm-evaluation-harness `LM` over an AlpaCare-JAX model (see the module docstring).

    Model args (`--model_args k=v,...`): model (HF dir or workdir, required), step, dtype, batch_size
    (rows per forward and decoding slots, default 16), pack_length (default 0), max_length (default:
    the model's context), max_gen_toks (default 256), data / fsdp / tensor (mesh shape over all devices;
    default FSDP over all of them).
    """

    def __init__(self, model: str | LoadedModel, *, step: int | None = None, dtype: str | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, pack_length: int = DEFAULT_PACK_LENGTH,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, data: int = 1,
                 fsdp: int = -1, tensor: int = 1, mesh: Mesh | None = None, **harness_args):
        super().__init__()
        # The harness passes its generic CLI settings too (device, max_batch_size): devices come from the mesh.
        harness_args.pop("device", None)
        harness_args.pop("max_batch_size", None)
        if harness_args:
            raise TypeError(f"{BACKEND_NAME}: unknown model args {sorted(harness_args)}")
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = DEFAULT_BATCH_SIZE  # fixed shapes compile once; "auto" probing compiles one per guess
        self.mesh = mesh or sharding.make_mesh(sharding.MeshConfig(data=int(data), fsdp=int(fsdp),
                                                                   tensor=int(tensor)))
        self.loaded = model if isinstance(model, LoadedModel) else load_model(
            model, step=step, dtype=dtype, mesh=self.mesh)
        self.tokenizer = self.loaded.tokenizer
        shards = self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1)  # what "batch" is split over
        self._batch_size = -(-int(batch_size) // shards) * shards  # rows split evenly over the batch axes
        self._batch_shards = shards
        self._pack_length = int(pack_length)
        self._max_length = int(max_length or self.loaded.model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self._graphdef, self._state = nnx.split(self.loaded.model)
        self.work: collections.Counter[str] = collections.Counter()  # programs run (and rows stopped early), by kind
        if jax.process_count() > 1:
            # Every process computes every request (the model spans all processes' chips); the harness
            # lets only LOCAL_RANK 0 aggregate and write, its convention for tensor-parallel launches.
            os.environ["LOCAL_RANK"] = str(jax.process_index())

    # ---- what the harness asks of a model ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.loaded.name

    def get_model_info(self) -> dict:
        return {"model_name": self.loaded.name, "model_step": self.loaded.step,
                "model_dtype": self.loaded.model.config.dtype, "mesh": dict(self.mesh.shape)}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As the `hf` backend with a LLaMA tokenizer: BOS first unless told not to or already in the text."""
        bos_text = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(bos_text)
        return self.tokenizer.encode(string, bos=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def _progress(self) -> bool:
        return jax.process_index() == 0

    # ---- log-likelihoods ----------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding gives it) per (key, context, continuation)."""
        by_context: dict[tuple[int, ...], set[tuple[int, ...]]] = collections.defaultdict(set)
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(f"{BACKEND_NAME}: a request needs a context and 1..{self.max_length} "
                                 f"continuation tokens, got {len(context)} and {len(continuation)}")
            by_context[tuple(context)].add(tuple(continuation))
        shared = {context: _SharedContext(context, sorted(conts)) for context, conts in by_context.items()
                  if _worth_sharing(len(context), [len(c) for c in conts], self.max_length)}

        sequences: dict[tuple[int, ...], _Sequence] = {}
        placed = []  # per request: its structure and its continuation
        for _, context, continuation in requests:
            if (group := shared.get(tuple(context))) is not None:
                placed.append((group, tuple(continuation)))
                continue
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]  # truncate from the left
            sequence = sequences.setdefault(tuple(whole[:-1]), _Sequence(tuple(whole[:-1])))
            if continuation[-1] not in sequence.candidates:
                sequence.candidates.append(continuation[-1])
            sequence.span = max(sequence.span, len(continuation))
            placed.append((sequence, tuple(continuation)))

        members = collections.Counter(id(structure) for structure, _ in placed)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self._progress)
        scores: dict[int, _Scores] = {}
        for done in self._score(list(shared.values()), list(sequences.values())):
            scores.update(done)
            bar.update(sum(members[key] for key in done))
        bar.close()

        results = []
        for (key, _, _), (structure, continuation) in zip(requests, placed):
            result = scores[id(structure)]
            if isinstance(structure, _SharedContext):
                j = structure.continuations.index(continuation)
                logprob, is_greedy = float(result.logprobs[j]), bool(result.greedy[j])
            else:  # the last n slots before the candidates predict the continuation but its last token
                n, inner = len(continuation), structure.span - 1
                picked = np.r_[np.arange(inner - n + 1, inner), inner + structure.candidates.index(continuation[-1])]
                logprob = float(np.sum(result.logprobs[picked], dtype=np.float64))
                is_greedy = bool(result.greedy[picked].all())
            results.append((logprob, is_greedy))
            if key is not None:  # rolling windows come without a key: cached per document instead
                self.cache_hook.add_partial("loglikelihood", key, (logprob, is_greedy))
        return results

    def _score(self, contexts: list[_SharedContext], sequences: list[_Sequence]) -> Iterator[dict[int, _Scores]]:
        """Every structure's scores, a forward at a time; a prefix that many share is run once for them."""
        for prefix, group in _prefix_groups(contexts, lambda c: len(c.tokens) - 1):
            yield from self._score_contexts(group, prefix)
        for prefix, group in _prefix_groups(sequences, lambda s: len(s.tokens) - s.span):
            yield from self._score_after_prefix(prefix, group) if prefix else self._score_sequences(group)

    def _prefix_cache(self, prefix: tuple[int, ...]) -> KVCache:
        length = bucket(len(prefix), LENGTH_STEPS)
        ids, segments = (np.zeros((self._batch_shards, length), np.int32) for _ in range(2))
        ids[:, :len(prefix)], segments[:, :len(prefix)] = prefix, 1
        # One copy per batch shard (rows [S, P], the same tokens in each): repeating it to a forward's rows is
        # then local to every device.
        with sharding.activate(self.mesh):
            cache = prefill_cache(self._graphdef, self._state,
                                  *(_global_array(x, self.mesh, ("batch", "length")) for x in (ids, segments)))
        self.work["shared prefixes"] += 1
        return cache

    def _score_after_prefix(self, prefix: tuple[int, ...], sequences: list[_Sequence]) -> Iterator[dict[int, _Scores]]:
        """As `_score_sequences`, for sequences that begin with `prefix`: it runs once, each row (one sequence)
        holds what follows it."""
        cache, start = self._prefix_cache(prefix), len(prefix)
        ordered = sorted(sequences, key=lambda s: (-len(s.tokens), s.tokens))
        for begin in range(0, len(ordered), self.batch_size):
            chunk = ordered[begin:begin + self.batch_size]
            length = bucket(len(chunk[0].tokens) - start, LENGTH_STEPS)
            slots = [[(p - start, t) for p, t in s.slots()] for s in chunk]
            width = _power_of_two(max(map(len, slots)))
            input_ids, segment_ids = (np.zeros((self.batch_size, length), np.int32) for _ in range(2))
            slot_positions, slot_targets = (np.zeros((self.batch_size, width), np.int32) for _ in range(2))
            for r, s in enumerate(chunk):
                n = len(s.tokens) - start
                input_ids[r, :n], segment_ids[r, :n] = s.tokens[start:], 1
                slot_positions[r, :len(slots[r])], slot_targets[r, :len(slots[r])] = zip(*slots[r])
            with sharding.activate(self.mesh):
                logprobs, greedy = _score_after_prefix(
                    self._graphdef, self._state, cache, *(_global_array(x, self.mesh, ("batch", "length")) for x in
                                                         (input_ids, segment_ids, slot_positions, slot_targets)))
            self.work["forwards after a shared prefix"] += 1
            logprobs, hits = _to_host(logprobs), _to_host(greedy) == slot_targets
            yield {id(s): _Scores(logprobs[r, :len(slots[r])], hits[r, :len(slots[r])]) for r, s in enumerate(chunk)}

    def _score_sequences(self, sequences: list[_Sequence]) -> Iterator[dict[int, _Scores]]:
        """Per forward of packed rows: {id(sequence): its slots' log p and whether each target is the argmax}."""
        for length, rows in _pack(sequences, self.batch_size, self._pack_length):
            slots = [[(offset + p, t) for s, offset in _offsets(row) for p, t in s.slots()] for row in rows]
            width = _power_of_two(max(map(len, slots)))
            input_ids, positions, segment_ids = (np.zeros((self.batch_size, length), np.int32) for _ in range(3))
            slot_positions, slot_targets = (np.zeros((self.batch_size, width), np.int32) for _ in range(2))
            for r, row in enumerate(rows):
                for segment, (s, offset) in enumerate(_offsets(row), start=1):
                    n = len(s.tokens)
                    input_ids[r, offset:offset + n] = s.tokens
                    positions[r, offset:offset + n] = np.arange(n)
                    segment_ids[r, offset:offset + n] = segment
                slot_positions[r, :len(slots[r])], slot_targets[r, :len(slots[r])] = zip(*slots[r])
            with sharding.activate(self.mesh):
                names = ("batch", "length")
                logprobs, greedy = _score_packed(
                    self._graphdef, self._state, *(_global_array(x, self.mesh, names) for x in
                                                   (input_ids, positions, segment_ids, slot_positions, slot_targets)))
            self.work["packed forwards"] += 1
            logprobs, hits = _to_host(logprobs), _to_host(greedy) == slot_targets
            done = {}
            for r, row in enumerate(rows):
                begin = 0
                for s, _ in _offsets(row):
                    end = begin + len(s.slots())
                    done[id(s)] = _Scores(logprobs[r, begin:end], hits[r, begin:end])
                    begin = end
            yield done

    def _score_contexts(self, contexts: list[_SharedContext], prefix: tuple[int, ...] = ()
                        ) -> Iterator[dict[int, _Scores]]:
        """Per forward of contexts: {id(context): log p of each continuation and whether greedy gives it}.
        With a `prefix` that every context begins with, it runs once and the rows hold what follows it."""
        cache, start = (self._prefix_cache(prefix) if prefix else None), len(prefix)
        ordered = sorted(contexts, key=lambda c: (-len(c.tokens), c.tokens))
        for begin in range(0, len(ordered), self.batch_size):
            chunk = ordered[begin:begin + self.batch_size]
            length = bucket(len(chunk[0].tokens) - start, LENGTH_STEPS)
            ways = _power_of_two(max(len(c.continuations) for c in chunk))
            rest = _power_of_two(max(len(t) for c in chunk for t in c.continuations) - 1)
            rows = self.batch_size
            context_ids, context_segments = (np.zeros((rows, length), np.int32) for _ in range(2))
            first_targets = np.zeros((rows, ways), np.int32)
            rest_ids, rest_segments, rest_targets = (np.zeros((ways, rows, rest), np.int32) for _ in range(3))
            for g, c in enumerate(chunk):
                context_ids[g, :len(c.tokens) - start] = c.tokens[start:]
                context_segments[g, :len(c.tokens) - start] = 1
                for j, continuation in enumerate(c.continuations):
                    n = len(continuation) - 1
                    first_targets[g, j] = continuation[0]
                    rest_ids[j, g, :n] = continuation[:-1]
                    rest_segments[j, g, :n] = 1
                    rest_targets[j, g, :n] = continuation[1:]
            with sharding.activate(self.mesh):
                rows_names, ways_names = ("batch", "length"), (None, "batch", "length")
                (first_logprobs, first_greedy), (rest_logprobs, rest_greedy) = _score_shared(
                    self._graphdef, self._state, cache, _global_array(context_ids, self.mesh, rows_names),
                    _global_array(context_segments, self.mesh, rows_names),
                    _global_array(first_targets, self.mesh, rows_names),
                    *(_global_array(x, self.mesh, ways_names) for x in (rest_ids, rest_segments, rest_targets)))
            self.work["shared-context forwards"] += 1
            first_logprobs, first_greedy, rest_logprobs, rest_greedy = (
                _to_host(x) for x in (first_logprobs, first_greedy, rest_logprobs, rest_greedy))
            done = {}
            for g, c in enumerate(chunk):
                logprobs, greedy = [], []
                for j, continuation in enumerate(c.continuations):
                    n = len(continuation) - 1
                    logprobs.append(first_logprobs[g, j] + np.sum(rest_logprobs[j, g, :n], dtype=np.float64))
                    greedy.append(first_greedy[g] == continuation[0]
                                  and bool((rest_greedy[j, g, :n] == continuation[1:]).all()))
                done[id(c)] = _Scores(np.asarray(logprobs), np.asarray(greedy))
            yield done

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document over the harness's disjoint windows of max_length tokens."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations, cut at the task's stop strings."""
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        eos_ids = tuple(dict.fromkeys((*self.loaded.model.config.eos_token_ids, self.eot_token_id)))
        jobs = [self._generation_job(req.args, eos_text) for req in requests]
        decode = self._decode_in_slots if jax.process_count() == 1 else self._decode_in_batches
        results: list[str] = [""] * len(jobs)
        bar = tqdm(total=len(jobs), desc="generate_until", disable=disable_tqdm or not self._progress)
        for job, text in decode(jobs, eos_ids):
            results[job] = text
            self.cache_hook.add_partial("generate_until", requests[job].args, text)
            bar.update(1)
        bar.close()
        return results

    def _decode_in_slots(self, jobs: list[_GenerationJob], eos_ids: tuple[int, ...]) -> Iterator[tuple[int, str]]:
        """(job, text) as each finishes, by continuous batching: a row is stopped as soon as its text holds a
        stop string, and its slot takes the next prompt (a group sharing a prefix at a time, longest first
        within it, as `hf` orders them)."""
        longest = max((len(job.prompt) + job.sampling.max_new_tokens for job in jobs), default=1)
        slots = DecodeSlots(self.loaded.model, num_slots=self.batch_size, max_length=bucket(longest),
                            eos_ids=eos_ids, chunk_tokens=CHUNK_TOKENS)
        number = {id(job): i for i, job in enumerate(jobs)}
        queue = collections.deque(  # (job, the prefix its group shares or ())
            (number[id(job)], prefix) for prefix, group in _prefix_groups(jobs, lambda job: len(job.prompt) - 1)
            for job in sorted(group, key=lambda job: (-len(job.prompt), number[id(job)])))
        prefix: Prefix | None = None  # the group being inserted shares it (groups are contiguous in the queue)
        running: dict[int, int] = {}  # slot -> job
        tokens: dict[int, list[int]] = {}
        while queue or running:
            # Every free slot is filled (a prefill at a time) before decoding goes on: a chunk of steps costs
            # about as much for a few busy rows as for all of them, each step reading every weight once.
            free = [s for s in slots.free_slots() if s not in running]
            while queue and free:
                shared = queue[0][1]
                if not shared:
                    prefix = None
                elif prefix is None or prefix.tokens != shared:
                    prefix = slots.prefill_prefix(shared)
                    self.work["shared prefixes"] += 1
                inserts: list[SlotRequest] = []
                while queue and queue[0][1] == shared and len(inserts) < len(free) and slots.fits(
                        [*(r.prompt for r in inserts), jobs[queue[0][0]].prompt], prefix):
                    job, _ = queue.popleft()
                    inserts.append(SlotRequest(free[len(inserts)], jobs[job].prompt, jobs[job].sampling))
                    running[inserts[-1].slot], tokens[job] = job, []
                for request, first in zip(inserts, slots.insert(inserts, prefix)):
                    tokens[running[request.slot]].append(first)
                self.work["prefills after a shared prefix" if prefix else "prefills"] += 1
                free = free[len(inserts):]
            if not slots.done.all():
                chunk = slots.advance()
                self.work["decode chunks"] += 1
                for slot, job in running.items():
                    tokens[job].extend(chunk.tokens[slot])
            finished = {}
            for slot, job in running.items():
                text = self.tok_decode([t for t in tokens[job] if t not in eos_ids])
                if slots.done[slot] or any(stop in text for stop in jobs[job].until):
                    finished[slot] = postprocess_generated_text(text, stop=jobs[job].until, think_end_token=None)
            stopped = [s for s in finished if not slots.done[s]]
            slots.stop(stopped)  # at a stop string: the slot takes the next prompt
            self.work["rows stopped at a stop string"] += len(stopped)
            for slot, text in finished.items():
                yield running.pop(slot), text

    def _decode_in_batches(self, jobs: list[_GenerationJob], eos_ids: tuple[int, ...]) -> Iterator[tuple[int, str]]:
        """(job, text) per batch of prompts (longest first), each batch one `generate` program, cut at the stop
        strings afterwards: for several processes, which the decoding slots' state does not span yet."""
        order = sorted(range(len(jobs)), key=lambda i: (-len(jobs[i].prompt), i))
        for begin in range(0, len(order), self.batch_size):
            batch = order[begin:begin + self.batch_size]
            outputs = generate(self.loaded.model, [jobs[i].prompt for i in batch], [jobs[i].sampling for i in batch],
                               eos_ids=eos_ids)
            self.work["generate programs"] += 1
            for job, row in zip(batch, outputs):
                text = self.tok_decode([t for t in row if t not in eos_ids])
                yield job, postprocess_generated_text(text, stop=jobs[job].until, think_end_token=None)

    def _generation_job(self, args: tuple[str, dict], eos_text: str) -> _GenerationJob:
        """A request's prompt (left-truncated, as `hf`), sampling settings and stop strings."""
        context, gen_kwargs = args
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = kwargs.pop("max_gen_toks")
        budget = self.max_length - max_gen_toks
        if budget <= 0:
            raise ValueError(f"{BACKEND_NAME}: max_gen_toks={max_gen_toks} leaves no room for a prompt in the "
                             f"model's {self.max_length} positions")
        sampling = SamplingConfig(max_new_tokens=max_gen_toks, temperature=float(kwargs.get("temperature", 0.0)),
                                  top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                                  seed=int(kwargs.get("seed") or 0))
        return _GenerationJob(prompt=self.tok_encode(context)[-budget:], sampling=sampling, until=until)

