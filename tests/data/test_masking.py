"""Loss masking on known strings: the unmasked targets are exactly the response followed by EOS."""

import numpy as np
import pytest

from alpacare_jax.data.examples import ExampleEncoder, encode_example, pad_example
from alpacare_jax.data.prompts import format_prompt
from alpacare_jax.data.tokenizer import load_tokenizer

CASES = [
    ("List two symptoms of anaemia.", "<noinput>", "Tiredness and shortness of breath on exertion."),
    ("Summarise the note in plain words.", "Pt c/o SOB, HR 112, SpO2 91% RA.",
     "The patient is short of breath, with a fast heart rate of 112 and oxygen levels of 91% on room air."),
    ("Answer briefly.", "", "\nYes: 2 tablets (500 mg each),  twice daily — with food. 漢字"),
]


@pytest.fixture(params=["sentencepiece", "tokenizer.json"])
def tokenizer(request, sp_tokenizer):
    if request.param == "sentencepiece":
        return sp_tokenizer
    return load_tokenizer(request.getfixturevalue("hf_tokenizer_dir"))


@pytest.mark.parametrize("instruction,input_text,response", CASES)
def test_unmasked_labels_decode_to_exactly_response_and_eos(tokenizer, instruction, input_text, response):
    ex = encode_example(tokenizer, instruction, input_text, response, max_length=1024)
    mask = ex["loss_mask"].astype(bool)
    targets = ex["labels"][mask]
    assert targets[-1] == tokenizer.eos_id
    assert tokenizer.decode(targets[:-1]) == response
    # The mask is one contiguous run at the end: nothing of the prompt is trained on.
    assert mask[-len(targets):].all() and not mask[: -len(targets)].any()
    # Inputs are BOS + prompt + response; labels are the same tokens shifted by one.
    tokens = np.concatenate([ex["input_ids"], ex["labels"][-1:]])
    assert tokens[0] == tokenizer.bos_id
    np.testing.assert_array_equal(ex["labels"][:-1], ex["input_ids"][1:])
    prompt_len = len(tokens) - len(targets)
    assert tokenizer.decode(tokens[1:prompt_len]) == format_prompt(instruction, input_text)


def test_truncation_cuts_the_end_and_keeps_arrays_aligned(sp_tokenizer):
    full = encode_example(sp_tokenizer, *CASES[1], max_length=1024)
    n = len(full["input_ids"])
    cut = encode_example(sp_tokenizer, *CASES[1], max_length=n - 5)
    assert len(cut["input_ids"]) == n - 5
    for key in full:
        np.testing.assert_array_equal(cut[key], full[key][: n - 5])
    assert sp_tokenizer.eos_id not in cut["labels"]


def test_encoder_reads_tfds_bytes_and_missing_input(sp_tokenizer):
    encode = ExampleEncoder(sp_tokenizer, 256)
    as_bytes = encode({"instruction": CASES[0][0].encode(), "input": b"<noinput>", "output": CASES[0][2].encode()})
    as_str = encode({"instruction": CASES[0][0], "output": CASES[0][2]})
    for key in as_str:
        np.testing.assert_array_equal(as_bytes[key], as_str[key])


def test_padded_row_follows_the_batch_contract(sp_tokenizer):
    ex = encode_example(sp_tokenizer, *CASES[0], max_length=256)
    n = len(ex["input_ids"])
    row = pad_example(ex, 256, sp_tokenizer.pad_id)
    assert all(v.shape == (256,) and v.dtype == np.int32 for v in row.values())
    np.testing.assert_array_equal(row["segment_ids"], [1] * n + [0] * (256 - n))
    np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
    assert not row["loss_mask"][n:].any() and (row["input_ids"][n:] == sp_tokenizer.pad_id).all()
