"""The Alpaca/AlpaCare prompt must match the template AlpaCare trained and evaluated with, byte for byte."""

import pytest

from alpacare_jax.data.prompts import format_prompt, has_input


def test_with_input_is_the_exact_alpaca_template():
    assert format_prompt("Summarise the note.", "Pt stable.") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise the note.\n\n### Input:\nPt stable.\n\n### Response:"
    )


@pytest.mark.parametrize("no_input", [None, "", "<noinput>", "  <noinput> ", "\n"])
def test_missing_empty_and_noinput_use_the_no_input_template(no_input):
    assert not has_input(no_input)
    assert format_prompt("What is asthma?", no_input) == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhat is asthma?\n\n### Response:"
    )


def test_input_text_is_kept_verbatim():
    assert format_prompt("Classify.", " a  b \n").endswith("### Input:\n a  b \n\n\n### Response:")
