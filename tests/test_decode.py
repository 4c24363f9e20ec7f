"""KV-cache decoding against transformers' generate and against full recomputation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from alpacare_jax import hf
from alpacare_jax.model import SamplingConfig, generate
from alpacare_jax.model.decode import sample_next
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
