"""One instruction record -> the token arrays of one training example (prompt masked out of the loss).

Following AlpaCare's training script (Stanford Alpaca's `train.py`): the model reads
`BOS + prompt + response + EOS`, the prompt is `format_prompt(instruction, input)` with the response
following `### Response:` directly, and only the response tokens and the EOS count in the loss.
Prompt and response are tokenized separately and concatenated, so the boundary between them is exact
(joint tokenization can merge the last prompt character with the first response character).

For tokens t0..tn (t0 = BOS) an example holds `input_ids = t0..t(n-1)` and `labels = t1..tn`, i.e.
labels are already shifted to be next-token targets, and `loss_mask[i] = 1` exactly when `labels[i]` is
a response token or the EOS. Examples longer than `max_length` are cut at the end (as AlpaCare's HF
tokenizer truncation does), which can cut the EOS or, for a very long prompt, every response token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from alpacare_jax.data.prompts import format_prompt
from alpacare_jax.data.tokenizer import Tokenizer

EXAMPLE_KEYS = ("input_ids", "labels", "loss_mask")


def _text(value: Any) -> str:
    """TFDS returns text features as bytes; python records hold str; a missing field is ""."""
    if value is None:
        return ""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_example(
    tokenizer: Tokenizer, instruction: str, input_text: str | None, output: str, max_length: int
) -> dict[str, np.ndarray]:
    """`{input_ids, labels, loss_mask}`, int32 arrays of one length <= `max_length` (see module doc)."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(format_prompt(instruction, input_text))
    response = tokenizer.encode(output) + [tokenizer.eos_id]
    tokens = np.asarray((prompt + response)[: max_length + 1], dtype=np.int32)
    is_target = np.zeros(len(tokens), dtype=np.int32)
    is_target[len(prompt) :] = 1
    return {"input_ids": tokens[:-1], "labels": tokens[1:], "loss_mask": is_target[1:]}


class ExampleEncoder:
    """Callable for `grain` `.map`: a MedInstruct record (bytes or str fields) -> `encode_example(...)`."""

    def __init__(self, tokenizer: Tokenizer, max_length: int):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return encode_example(
            self.tokenizer,
            _text(record["instruction"]),
            _text(record.get("input")),
            _text(record["output"]),
            self.max_length,
        )


def pad_example(example: Mapping[str, np.ndarray], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """An unpacked row of the batch contract: one example (segment 1) then padding (segment 0)."""
    n = len(example["input_ids"])
    pad = max_length - n
    return {
        "input_ids": np.pad(example["input_ids"], (0, pad), constant_values=pad_id),
        "labels": np.pad(example["labels"], (0, pad), constant_values=pad_id),
        "loss_mask": np.pad(example["loss_mask"], (0, pad)),
        "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
        "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
    }


def empty_row(max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row that is all padding (fills the last eval batch: contributes nothing to any loss)."""
    return pad_example({k: np.zeros(0, np.int32) for k in EXAMPLE_KEYS}, max_length, pad_id)
