"""One greedy answer from the model being trained: the demo's proof that the model learned something.

Deliberately minimal (recomputes the whole sequence each token, no KV cache): it runs once at the end
of a run. The real decoder (`alpacare_jax.generate`, KV cache, batching, sampling) replaces it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpacare_jax.data.prompts import format_prompt
from alpacare_jax.data.tokenizer import Tokenizer


def greedy_answer(graphdef: nnx.GraphDef, params: dict, tokenizer: Tokenizer, instruction: str,
                  *, input_text: str | None = None, max_new_tokens: int = 64, max_length: int | None = None) -> str:
    """The response to `instruction` in the training prompt format, decoded greedily until EOS."""
    prompt = tokenizer.encode(format_prompt(instruction, input_text), bos=True)
    length = len(prompt) + max_new_tokens
    if max_length is not None:
        length = min(length, max_length)
    if len(prompt) >= length:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate (max length {length})")
    tokens = np.full((1, length), tokenizer.pad_id, np.int32)
    tokens[0, : len(prompt)] = prompt

    @jax.jit
    def next_token(params, tokens, position):
        # Causal attention: tokens after `position` (still padding) cannot influence its logits.
        logits = nnx.merge(graphdef, params)(tokens)
        return jnp.argmax(logits[0, position - 1])

    answer = []
    for position in range(len(prompt), length):
        token = int(next_token(params, tokens, position))
        if token == tokenizer.eos_id:
            break
        tokens[0, position] = token
        answer.append(token)
    return tokenizer.decode(answer).strip()
