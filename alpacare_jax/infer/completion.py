"""Text in, text out: the training prompt, the context budget and the KV-cache decoder in one place.

`generate` (evaluation outputs), `serve` (the OpenAI-compatible server) and the end of a training run
all answer through `complete`, so they build the same prompt as training (`format_prompt`, BOS, no
EOS), count tokens the same way and stop on the same EOS ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from alpacare_jax.data.prompts import prompt_ids
from alpacare_jax.data.tokenizer import Tokenizer
from alpacare_jax.model import Llama, SamplingConfig, generate


class ContextError(ValueError):
    """A prompt that leaves no room for the requested answer in the model's context."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int  # after any truncation
    completion_tokens: int  # EOS included when the model emitted it
    finish_reason: str  # "stop": the model emitted EOS; "length": max_new_tokens was reached
    prompt_truncated: bool = False


def fit_to_context(prompt: Sequence[int], max_new_tokens: int, context: int, *, truncate: bool) -> list[int]:
    """`prompt` shortened so that prompt + answer fit in `context` positions, or ContextError.

    Truncation keeps BOS and the end of the prompt (the instruction's tail and `### Response:`, which
    the answer depends on most) and drops tokens right after BOS, as training's truncation keeps the
    start of an example instead; an evaluation set still gets an answer for every row.
    """
    budget = context - max_new_tokens
    if len(prompt) <= budget:
        return list(prompt)
    if not truncate or budget < 2:
        raise ContextError(f"the prompt has {len(prompt)} tokens; with {max_new_tokens} new tokens it exceeds "
                           f"the model's context of {context} positions")
    return [prompt[0], *prompt[len(prompt) - budget + 1:]]


def complete(model: Llama, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
             *, truncate: bool = True) -> list[Completion]:
    """One completion per prompt (token ids, BOS included), decoded in one batch with the KV cache.

    Rows stop at the first EOS of the model or the tokenizer (LLaMA-3 instruct models have several).
    """
    context = model.config.max_position_embeddings
    max_new = min(sampling.max_new_tokens, context - 1)
    if max_new != sampling.max_new_tokens:
        sampling = dataclasses.replace(sampling, max_new_tokens=max_new)
    fitted = [fit_to_context(p, max_new, context, truncate=truncate) for p in prompts]
    eos_ids = tuple(dict.fromkeys((*model.config.eos_token_ids, tokenizer.eos_id)))
    outputs = generate(model, fitted, sampling, eos_ids=eos_ids)
    completions = []
    for prompt, original, tokens in zip(fitted, prompts, outputs):
        stopped = bool(tokens) and tokens[-1] in eos_ids
        text = tokenizer.decode(tokens[:-1] if stopped else tokens)
        completions.append(Completion(text=text, prompt_tokens=len(prompt), completion_tokens=len(tokens),
                                      finish_reason="stop" if stopped else "length",
                                      prompt_truncated=len(prompt) != len(original)))
    return completions


def answer(model: Llama, tokenizer: Tokenizer, instruction: str, input_text: str | None = None,
           sampling: SamplingConfig = SamplingConfig()) -> str:
    """The model's response to one instruction, as training taught it to answer (greedy by default)."""
    [completion] = complete(model, tokenizer, [prompt_ids(tokenizer, instruction, input_text)], sampling)
    return completion.text.strip()
