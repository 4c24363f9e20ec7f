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

# A local Cloud Storage emulator for the tests of gs:// paths (started on first use, once per session).
from tests.storage.emulator import gcs_bucket, gcs_emulator  # noqa: E402, F401

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

    Built once per session by the demo's bootstrap (what the demo does on its first run); the tests that
    train point their configs at these files, so nothing is rebuilt per test.
    """
    from alpacare_jax.data import SAMPLE_JSON, bootstrap, pipeline
    from alpacare_jax.train.config import base_config

    root = tmp_path_factory.mktemp("prepared")
    bootstrap.ensure_tokenizer(SAMPLE_JSON, root / "tokenizer", TEST_VOCAB)
    data_config = pipeline.default_data_config()
    data_config.data_dir = str(root / "tfds")
    bootstrap.ensure_dataset(data_config, SAMPLE_JSON, base_config().bootstrap.validation_fraction)
    return root
