"""The Alpaca / AlpaCare instruction prompt, shared by training and generation.

AlpaCare fine-tunes with Stanford Alpaca's `train.py`: the prompt below is built from the instruction
(and the input when there is one), the response follows the prompt directly (nothing is inserted after
`### Response:`), and EOS is appended to the response. Generation must build exactly the same prompt,
which is why this lives in one module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alpacare_jax.data.tokenizer import Tokenizer

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# MedInstruct-52k writes "<noinput>" for tasks without input; other Alpaca-style files leave it empty.
NO_INPUT_MARKERS = frozenset({"", "<noinput>"})

# AlpaCare's generation script answers every iCliniq question with this instruction and the patient's
# message as the input; the released reference files keep it only inside claude-2's prompt.
ICLINIQ_INSTRUCTION = (
    "If you are a doctor, please answer the medical questions based on the patient's description."
)


def has_input(input_text: str | None) -> bool:
    """True when `input_text` carries content: None, empty, whitespace and `<noinput>` do not."""
    return input_text is not None and input_text.strip() not in NO_INPUT_MARKERS


def format_prompt(instruction: str, input: str | None = None) -> str:  # noqa: A002 (Alpaca's field name)
    """The exact Alpaca prompt for one task, ending in `### Response:` (the response follows directly)."""
    if has_input(input):
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def prompt_ids(tokenizer: Tokenizer, instruction: str, input: str | None = None) -> list[int]:  # noqa: A002
    """Token ids of the exact training prompt: BOS + the template; the response is to follow directly."""
    return tokenizer.encode(format_prompt(instruction, input), bos=True)
