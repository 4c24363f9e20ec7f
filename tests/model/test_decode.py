"""KV-cache decoding against transformers' generate and against full recomputation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alpacare_jax import hf
from alpacare_jax.model import Llama, SamplingConfig, generate
from alpacare_jax.model.decode import (
    MIN_TEMPERATURE,
    DecodeSlots,
    SamplingParams,
    SlotRequest,
    filter_logits,
    sample_next,
)
from tests.hf_fixtures import make_hf_model, save_hf

PROMPT_LENGTHS = (3, 11, 7, 20, 1)
_COMPILES = []  # one entry per program XLA compiled in this process
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _seconds, **_: event == "/jax/core/compile/backend_compile_duration" and _COMPILES.append(event))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch_model = make_hf_model("gqa_2kv", seed=5)
    path = save_hf(torch_model, tmp_path_factory.mktemp("hf"))
    return torch_model, hf.load_pretrained(path)


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, n).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(torch_model, prompts, max_new_tokens, eos=None):
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding, as for decoder-only batched generation
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        out = torch_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                   min_new_tokens=0, eos_token_id=eos, pad_token_id=0)
    rows = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


def test_greedy_tokens_equal_transformers_generate(models):
    torch_model, model = models
    prompts = _prompts()
    # The 20-token prompt (bucket 32) grows past the first attention window (64 slots) into the next.
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=48), eos_ids=[-5])
    assert ours == _hf_greedy(torch_model, prompts, 48)
    assert all(len(row) == 48 for row in ours)


def test_eos_stops_each_row_as_in_transformers(models):
    torch_model, model = models
    prompts = _prompts(seed=1)
    free_run = generate(model, prompts, SamplingConfig(max_new_tokens=32), eos_ids=[-5])
    eos = free_run[1][4]  # a token row 1 emits early, so at least that row stops before the end
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=32), eos_ids=[eos])
    assert ours == _hf_greedy(torch_model, prompts, 32, eos=eos)
    assert len(ours[1]) <= 5 and ours[1][-1] == eos


def test_kv_cache_decoding_equals_recomputing_the_sequence(models):
    _, model = models
    prompts = _prompts(seed=2)
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=16), eos_ids=[-5])
    # No cache: the whole sequence through the model at every step (right-padded to one shape, so
    # that one compiled program serves every step; padding comes after the token read and is causal-masked).
    forward = nnx.jit(lambda m, ids: m(ids))
    for prompt, new_tokens in zip(prompts, ours):
        sequence = list(prompt)
        for _ in range(16):
            padded = np.zeros((1, 64), np.int32)
            padded[0, : len(sequence)] = sequence
            sequence.append(int(jnp.argmax(forward(model, jnp.asarray(padded))[0, len(sequence) - 1])))
        assert new_tokens == sequence[len(prompt):]


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
    rngs = jax.random.split(jax.random.key(0), 1)[0]
    top_k = np.asarray(sample_next(logits, rngs, SamplingConfig(temperature=1.0, top_k=2)))
    assert set(top_k) == {0, 1}
    top_p = np.asarray(sample_next(logits, rngs, SamplingConfig(temperature=1.0, top_p=0.75)))
    assert set(top_p) == {0, 1} and 0.55 < np.mean(top_p == 0) < 0.70  # renormalised 0.5 / 0.8
    full = np.asarray(sample_next(logits, rngs, SamplingConfig(temperature=1.0)))
    assert set(full) == {0, 1, 2, 3}


def _filter_reference(logits, temperature, top_k, top_p):
    """Which tokens top-k then top-p keep, by sorting (numpy), as the filters are usually written."""
    logits = logits / (temperature or 1.0)
    keep = np.ones(logits.shape, bool)
    if top_k:
        keep &= logits >= np.sort(logits)[::-1][min(top_k, len(logits)) - 1]
    if top_p < 1:
        probs = np.exp(np.where(keep, logits, -np.inf) - logits[keep].max())
        probs /= probs.sum()
        ranked = np.sort(probs)[::-1]
        keep &= probs >= ranked[min(int(np.sum(np.cumsum(ranked) < top_p)), len(ranked) - 1)]
    return keep


def test_filters_keep_the_tokens_a_sort_keeps():
    """The bisection cut-offs keep exactly the tokens of sort-based top-k / top-p, ties (and -0.0) included."""
    rng = np.random.default_rng(0)
    filtered = jax.jit(filter_logits)
    for trial in range(40):
        vocab = (7, 64, 300)[trial % 3]
        logits = (rng.standard_normal((4, vocab)) * rng.uniform(0.1, 5)).astype(np.float32)
        if trial % 4 == 0:
            logits = np.round(logits)  # ties at the cut-offs, and -0.0 beside 0.0
        params = SamplingParams(temperature=rng.uniform(0.2, 2, 4).astype(np.float32),
                                top_p=np.asarray([1.0, *rng.uniform(0.05, 1, 3)], np.float32),
                                top_k=np.asarray([rng.integers(0, vocab + 3), 0, *rng.integers(0, vocab + 3, 2)],
                                                 np.int32))
        kept = np.isfinite(np.asarray(filtered(jnp.asarray(logits), params)))
        for row in range(4):
            expected = _filter_reference(logits[row], params.temperature[row], params.top_k[row], params.top_p[row])
            np.testing.assert_array_equal(kept[row], expected, err_msg=f"trial {trial}, row {row}")


def test_tpu_cache_layout_decodes_the_same_tokens(models):
    """TPU programs keep the cache slots-first (see KVCache): same tokens as the CPU layout, alone and in slots."""
    _, model = models
    tpu_model = nnx.merge(nnx.graphdef(Llama(model.config.replace(attention_impl="splash"), rngs=nnx.Rngs(0))),
                          nnx.state(model))
    requests = _requests(seed=8, count=4)
    alone = [generate(model, [p], [s], eos_ids=[-5])[0] for p, s in requests]
    assert [generate(tpu_model, [p], [s], eos_ids=[-5])[0] for p, s in requests] == alone
    slots = DecodeSlots(tpu_model, num_slots=2, max_length=64, eos_ids=[-5], chunk_tokens=4)
    assert slots._state.cache.heads_major is False
    assert _run_slots(slots, requests) == alone


def _run_slots(slots: DecodeSlots, requests: list[tuple[list[int], SamplingConfig]], *, stop_after=None,
               prefix=None):
    """Serves `requests` through `slots` as a server does: each is inserted as soon as a slot is free
    (several at once when they fit one prefill), while the others keep decoding. `stop_after` maps a
    request to the number of chunks after which it is stopped; `prefix` (a `Prefix` every prompt begins
    with) is continued instead of prefilling whole prompts. Returns each request's tokens."""
    out = [[] for _ in requests]
    waiting, owner, chunks = list(range(len(requests))), {}, {}
    while waiting or owner:
        inserted = []
        for slot in slots.free_slots():
            if waiting and slots.fits([requests[i][0] for i in [*inserted, waiting[0]]], prefix):
                inserted.append(waiting.pop(0))
                owner[slot] = inserted[-1]
        if inserted:
            by_slot = [(s, i) for s, i in owner.items() if i in inserted]
            first = slots.insert([SlotRequest(s, *requests[i]) for s, i in by_slot], prefix)
            for (slot, i), token in zip(by_slot, first):
                out[i].append(token)
                if slots.done[slot]:
                    del owner[slot]
        if not owner:
            continue
        chunk = slots.advance()
        for slot, i in list(owner.items()):
            out[i].extend(chunk.tokens[slot])
            chunks[i] = chunks.get(i, 0) + 1
            if stop_after and chunks[i] == stop_after.get(i):
                slots.stop([slot])
            if slots.done[slot]:
                del owner[slot]
    return out


def _requests(seed, count):
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        prompt = rng.integers(3, 128, int(rng.integers(1, 31))).tolist()
        sampled = i % 2 == 1
        requests.append((prompt, SamplingConfig(max_new_tokens=int(rng.integers(1, 33)),
                                                temperature=float(rng.uniform(0.5, 1.5)) if sampled else 0.0,
                                                top_p=float(rng.uniform(0.5, 1)) if i % 4 == 1 else 1.0,
                                                top_k=int(rng.integers(0, 20)) if i % 4 == 3 else 0, seed=i)))
    return requests


def test_slots_give_each_request_what_it_gets_alone(models):
    """Continuous batching: 12 requests (greedy and sampled, each its own settings and length) through 4
    slots, inserted as slots free up while others decode, get exactly their tokens decoded alone."""
    _, model = models
    requests = _requests(seed=3, count=12)
    alone = [generate(model, [prompt], [sampling], eos_ids=[-5])[0] for prompt, sampling in requests]
    slots = DecodeSlots(model, num_slots=4, max_length=64, eos_ids=[-5], chunk_tokens=4, prefill_tokens=64)
    assert _run_slots(slots, requests) == alone
    assert [len(row) for row in alone] == [s.max_new_tokens for _, s in requests]
    # A batch of them through one program gets the same (rows are independent, whatever the padding).
    assert generate(model, [p for p, _ in requests], [s for _, s in requests], eos_ids=[-5]) == alone
    # One config for a whole batch: each row draws its own stream, so equal prompts get different answers.
    shared = generate(model, [requests[1][0]] * 4, requests[1][1], eos_ids=[-5])
    assert len({tuple(row) for row in shared}) > 1


def test_slots_continuing_a_prefilled_prefix_give_what_whole_prompts_get(models):
    """Requests that begin with the same 21 tokens (a few-shot primer) and differ after them: the primer is
    prefilled once and each slot runs only the rest, with the same tokens as each whole prompt alone; 7
    requests through 3 slots (so the slots are refilled while others decode, and rows are padded to 4)."""
    _, model = models
    rng = np.random.default_rng(8)
    primer = rng.integers(3, 128, 21).tolist()
    requests = [(primer + prompt[:int(rng.integers(1, 13))], sampling) for prompt, sampling in _requests(9, 7)]
    alone = [generate(model, [prompt], [sampling], eos_ids=[-5])[0] for prompt, sampling in requests]
    slots = DecodeSlots(model, num_slots=3, max_length=64, eos_ids=[-5], chunk_tokens=4, prefill_tokens=64)
    prefix = slots.prefill_prefix(primer)
    assert _run_slots(slots, requests, prefix=prefix) == alone
    with pytest.raises(ValueError, match="does not continue"):
        slots.insert([SlotRequest(0, primer[1:] + [5, 6], SamplingConfig())], prefix)
    with pytest.raises(ValueError, match="does not continue"):
        slots.insert([SlotRequest(0, primer, SamplingConfig())], prefix)  # nothing after it to run


def test_stopped_slots_emit_nothing_more_and_are_reused(models):
    _, model = models
    prompts = _prompts(seed=4)
    requests = [(p, SamplingConfig(max_new_tokens=16)) for p in prompts]
    slots = DecodeSlots(model, num_slots=2, max_length=64, eos_ids=[-5], chunk_tokens=4)
    rows = _run_slots(slots, requests, stop_after={0: 2, 3: 1})
    assert [len(r) for r in rows] == [1 + 8, 16, 16, 1 + 4, 16]  # 0 and 3 stopped after 2 and 1 chunks
    # The slots they left (with their keys still cached) serve the next requests as if new.
    alone = [generate(model, [p], [s], eos_ids=[-5])[0] for p, s in requests]
    assert rows[1:3] + rows[4:] == alone[1:3] + alone[4:]
    assert rows[0] == alone[0][:9] and rows[3] == alone[3][:5]


def test_eos_frees_a_slot_at_once(models):
    _, model = models
    prompts = _prompts(seed=1)
    free_run = generate(model, prompts, [SamplingConfig(max_new_tokens=32)] * 5, eos_ids=[-5])
    eos = free_run[1][4]
    slots = DecodeSlots(model, num_slots=2, max_length=64, eos_ids=[eos], chunk_tokens=4)
    rows = _run_slots(slots, [(p, SamplingConfig(max_new_tokens=32)) for p in prompts])
    assert rows == generate(model, prompts, [SamplingConfig(max_new_tokens=32)] * 5, eos_ids=[eos])
    assert rows[1][-1] == eos and len(rows[1]) <= 5


def test_sampling_settings_compile_nothing_new(models):
    """Temperature, top-p, top-k, seed and max_new_tokens are traced: 50 settings, no new program; and
    once warmed up, the slots compile nothing for any number of requests or prompt lengths."""
    _, model = models
    prompts = _prompts(seed=5)[:3]
    rng = np.random.default_rng(0)
    settings = [SamplingConfig(max_new_tokens=int(rng.integers(1, 9)), temperature=float(rng.uniform(0, 2)),
                               top_p=float(rng.uniform(0.05, 1)), top_k=int(rng.integers(0, 128)),
                               seed=int(rng.integers(0, 2**31))) for _ in range(50)]
    generate(model, prompts, settings[0], eos_ids=[-5])
    slots = DecodeSlots(model, num_slots=3, max_length=64, eos_ids=[-5], chunk_tokens=4)
    slots.warm_up()
    compiled = len(_COMPILES)
    for i, setting in enumerate(settings[1:]):
        generate(model, prompts, setting, eos_ids=[-5])
        _run_slots(slots, [(p, setting) for p in prompts[: 1 + i % 3]])
    assert len(_COMPILES) == compiled


def test_tiny_temperatures_decode_greedily(models):
    """1e-40 would overflow the logits to inf (NaN probabilities): below MIN_TEMPERATURE is greedy."""
    _, model = models
    prompts = _prompts(seed=6)
    greedy = generate(model, prompts, SamplingConfig(max_new_tokens=8), eos_ids=[-5])
    for temperature in (1e-40, 5e-324, 1e-6):
        tiny = SamplingConfig(max_new_tokens=8, temperature=temperature, top_p=0.9, seed=3)
        assert tiny.temperature == 0.0
        assert generate(model, prompts, tiny, eos_ids=[-5]) == greedy
    assert SamplingConfig(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE


def test_invalid_sampling_settings_are_refused():
    for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=0.0),
                dict(top_p=float("nan")), dict(top_k=-1), dict(temperature=-0.1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
