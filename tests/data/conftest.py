"""Fixtures for the data tests: the bundled sample, a tokenizer trained on it, built TFDS datasets.

Everything built is session-scoped (one build per xdist worker) and lives under pytest's tmp dirs.
The real AlpaCare release files come from the `alpacare_data` fixture (tests/conftest.py), read from
beside the repository and never copied into it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alpacare_jax.data import SAMPLE_JSON

REPO_ROOT = Path(__file__).resolve().parents[2]
# Validation share used for the sample build: large enough that the tiny sample has a real eval split.
SAMPLE_VALIDATION_FRACTION = 0.15


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A LLaMA-style sentencepiece tokenizer trained on the sample (as the demo does)."""
    from alpacare_jax.data.tokenizer import train_tokenizer

    return train_tokenizer(SAMPLE_JSON, tmp_path_factory.mktemp("sp_tokenizer"), vocab_size=1024)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE `tokenizer.json` with LLaMA-3-style special tokens, trained with `tokenizers`."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    records = json.loads(SAMPLE_JSON.read_text())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([r["output"] for r in records], trainer)
    out = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory) -> Path:
    """A TFDS data dir with `medinstruct/medinstruct_52k` built from the bundled sample."""
    from alpacare_jax.data.build import build_dataset

    data_dir = tmp_path_factory.mktemp("tfds")
    build_dataset("medinstruct_52k", SAMPLE_JSON, data_dir, validation_fraction=SAMPLE_VALIDATION_FRACTION)
    return data_dir


@pytest.fixture()
def data_config(sample_data_dir):
    """Pipeline config reading the sample build; small batches so tests stay fast."""
    from alpacare_jax.data.pipeline import default_data_config

    config = default_data_config()
    config.data_dir = str(sample_data_dir)
    config.max_length = 512
    config.global_batch_size = 4
    config.read_threads = 0
    return config
