"""KV-cache decoding against transformers' generate and against full recomputation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alpacare_jax import hf
from alpacare_jax.model import SamplingConfig, generate
from alpacare_jax.model.decode import _advance_program, _decode, _prefill_program, decode_chunks, sample_next
from tests.hf_fixtures import make_hf_model, save_hf

PROMPT_LENGTHS = (3, 11, 7, 20, 1)


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
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=32), eos_ids=[-5])
    assert ours == _hf_greedy(torch_model, prompts, 32)
    assert all(len(row) == 32 for row in ours)


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
    import jax

    rngs = jax.random.split(jax.random.key(0), 1)[0]
    top_k = np.asarray(sample_next(logits, rngs, SamplingConfig(temperature=1.0, top_k=2)))
    assert set(top_k) == {0, 1}
    top_p = np.asarray(sample_next(logits, rngs, SamplingConfig(temperature=1.0, top_p=0.75)))
    assert set(top_p) == {0, 1} and 0.55 < np.mean(top_p == 0) < 0.70  # renormalised 0.5 / 0.8
    full = np.asarray(sample_next(logits, rngs, SamplingConfig(temperature=1.0)))
    assert set(full) == {0, 1, 2, 3}


def _chunked(model, prompts, samplings, **kwargs):
    rows = [[] for _ in prompts]
    chunks = list(decode_chunks(model, prompts, samplings, eos_ids=[-5], **kwargs))
    for chunk in chunks:
        for row, tokens in zip(rows, chunk.tokens):
            row.extend(tokens)
    assert chunks[-1].done == [True] * len(prompts)
    return rows, chunks


def test_chunked_decoding_gives_the_tokens_of_one_program(models):
    _, model = models
    prompts = _prompts(seed=3)
    greedy = [SamplingConfig(max_new_tokens=n) for n in (20, 3, 17, 20, 9)]
    rows, chunks = _chunked(model, prompts, greedy, chunk_tokens=4)
    assert rows == generate(model, prompts, greedy, eos_ids=[-5])
    assert [len(r) for r in rows] == [20, 3, 17, 20, 9]
    assert len(chunks) == 1 + 5  # the prefill's token, then ceil(19 / 4) chunks
    # Sampled rows (each its own settings and seed) draw the same tokens whatever the chunking or batch.
    sampled = [SamplingConfig(max_new_tokens=12, temperature=t, top_p=p, top_k=k, seed=s)
               for t, p, k, s in [(1.0, 0.9, 0, 1), (0.7, 1.0, 5, 2), (0.0, 1.0, 0, 3), (1.3, 0.5, 40, 4),
                                  (1.0, 1.0, 0, 5)]]
    rows, _ = _chunked(model, prompts, sampled, chunk_tokens=5)
    assert rows == generate(model, prompts, sampled, eos_ids=[-5])
    alone = [generate(model, [p], [s], eos_ids=[-5])[0] for p, s in zip(prompts, sampled)]
    assert rows == alone
    # One config for the whole batch: each row draws its own stream, so equal prompts get different answers.
    shared = generate(model, [prompts[0]] * 4, sampled[0], eos_ids=[-5])
    assert len({tuple(row) for row in shared}) > 1
    assert rows[2] == generate(model, [prompts[2]], SamplingConfig(max_new_tokens=12), eos_ids=[-5])[0]


def test_stopped_rows_emit_nothing_more(models):
    _, model = models
    prompts = _prompts(seed=4)[:2]
    settings = [SamplingConfig(max_new_tokens=16)] * 2
    seen = []
    rows = [[], []]
    for chunk in decode_chunks(model, prompts, settings, eos_ids=[-5], chunk_tokens=4,
                               stop_rows=lambda: [len(seen) >= 2, False]):
        seen.append(chunk)
        for row, tokens in zip(rows, chunk.tokens):
            row.extend(tokens)
    assert len(rows[0]) == 1 + 4 and len(rows[1]) == 16  # row 0 stopped after the second chunk


def test_sampling_settings_compile_nothing_new(models):
    """Temperature, top-p, top-k, seed and max_new_tokens are traced: 50 settings, no new program."""
    _, model = models
    prompts = _prompts(seed=5)[:3]
    rng = np.random.default_rng(0)
    settings = [SamplingConfig(max_new_tokens=int(rng.integers(1, 9)), temperature=float(rng.uniform(0, 2)),
                               top_p=float(rng.uniform(0.05, 1)), top_k=int(rng.integers(0, 128)),
                               seed=int(rng.integers(0, 2**31))) for _ in range(50)]
    generate(model, prompts, settings[0], eos_ids=[-5])
    list(decode_chunks(model, prompts, [settings[0]] * 3, eos_ids=[-5]))
    programs = [f._cache_size() for f in (_decode, _prefill_program, _advance_program)]
    for setting in settings[1:]:
        generate(model, prompts, setting, eos_ids=[-5])
        list(decode_chunks(model, prompts, [setting] * 3, eos_ids=[-5]))
    assert [f._cache_size() for f in (_decode, _prefill_program, _advance_program)] == programs


def test_invalid_sampling_settings_are_refused():
    for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=0.0),
                dict(top_p=float("nan")), dict(top_k=-1), dict(temperature=-0.1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
