"""Log-probabilities a model gives to token sequences: what scoring tools (an OpenAI-style `echo` +
`logprobs` request, a log-likelihood evaluation) ask of a causal LM.

Sequences are right-padded to bucketed shapes, so a handful of programs serve every length; the
number of alternatives is fixed at `MAX_TOP_LOGPROBS` (or the vocabulary) (a caller keeps as many as it was asked for),
so it compiles nothing new either.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpacare_jax.model.decode import BATCH_BUCKETS, bucket
from alpacare_jax.model.llama import Llama

MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class TokenScores:
    """For each token after the first: its log-probability given the tokens before it, and the
    `MAX_TOP_LOGPROBS` most likely tokens at its position as (token id, log-probability), best first."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, input_ids, segment_ids):
    model: Llama = nnx.merge(graphdef, state)
    logprobs = jax.nn.log_softmax(model(input_ids, segment_ids=segment_ids)[:, :-1], axis=-1)
    chosen = jnp.take_along_axis(logprobs, input_ids[:, 1:, None], axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logprobs.shape[-1]))
    return chosen, top_values, top_ids


def score_tokens(model: Llama, sequences: Sequence[Sequence[int]]) -> list[TokenScores]:
    """The scores of each sequence (token ids as the model sees them, BOS included by the caller)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("scoring needs at least one sequence and no empty sequence")
    length = bucket(max(len(s) for s in sequences))
    batch = bucket(len(sequences), BATCH_BUCKETS)
    input_ids = np.zeros((batch, length), np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = sequence
        segment_ids[row, : len(sequence)] = 1
    graphdef, state = nnx.split(model)
    chosen, top_values, top_ids = (np.asarray(x) for x in _score(graphdef, state, jnp.asarray(input_ids),
                                                                 jnp.asarray(segment_ids)))
    scores = []
    for row, sequence in enumerate(sequences):
        n = len(sequence) - 1
        top = [list(zip(ids.tolist(), values.tolist())) for ids, values in zip(top_ids[row, :n], top_values[row, :n])]
        scores.append(TokenScores(logprobs=chosen[row, :n].tolist(), top=top))
    return scores
