"""Shared test setup: eight fake CPU devices stand in for a TPU slice.

XLA reads the flag when jax initialises its backends, so it must be set before any test imports jax.
With libtpu installed (the `tpu` extra, for the ahead-of-time compile tests) jax would also try to
bring up a TPU backend and warn that there is none: the tests run on CPU, and compile for TPU only
through abstract topologies, which need no TPU backend.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The vocabulary of the tokenizer the `prepared` fixture trains: small, so tiny test models stay tiny.
TEST_VOCAB = 512

# The real AlpaCare release files (seed tasks, MedInstruct-test, reference answers) beside the repository.
ALPACARE_DATA = Path(__file__).resolve().parents[2] / "shared" / "alpacare_data"


@pytest.fixture(scope="session")
def alpacare_data() -> Path:
    if not (ALPACARE_DATA / "MedInstruct-test.jsonl").is_file():
        pytest.skip(f"AlpaCare release files not found at {ALPACARE_DATA}")
    return ALPACARE_DATA


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A directory with `tokenizer/` (a 512-piece sentencepiece model) and `tfds/` built from the bundled sample.

    Built once per session by the trainer's own bootstrap (what the demo does on first run); the tests that
    train point their configs at these files, so nothing is rebuilt per test.
    """
    from etils import epath

    from alpacare_jax.train.config import base_config
    from alpacare_jax.train.loop import prepare_data, prepare_tokenizer

    root = epath.Path(tmp_path_factory.mktemp("prepared"))
    config = base_config()
    config.bootstrap.source = "sample"
    config.bootstrap.tokenizer_vocab_size = TEST_VOCAB
    prepare_tokenizer(config, root)
    prepare_data(config, root)
    return Path(root)
