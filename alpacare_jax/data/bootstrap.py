"""The demo's bootstrap: a tokenizer and a TFDS dataset made from one MedInstruct-format JSON file.

A real run starts from an HF checkpoint's tokenizer and a dataset built once with
`python -m alpacare_jax.data.build`. The CPU demo has neither, so when a config sets
`bootstrap.source` (a MedInstruct-52k JSON file, or "sample" for the one bundled with the package) the
trainer calls these two functions first; both do nothing when their output already exists, so a
restarted run reuses what its first start made.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ml_collections

from alpacare_jax.data import SAMPLE_JSON, pipeline
from alpacare_jax.data.build import build_dataset
from alpacare_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


def source_file(source: str) -> Path:
    """The JSON file `bootstrap.source` names ("sample": the bundled sample)."""
    path = SAMPLE_JSON if source == "sample" else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"config.bootstrap.source={source!r}: no such file")
    return path


def ensure_tokenizer(source: Path, tokenizer_dir: str | Path, vocab_size: int) -> Tokenizer:
    """The tokenizer in `tokenizer_dir`, first trained on `source` if the directory does not exist."""
    if not Path(tokenizer_dir).exists():
        log.info("training a %d-piece tokenizer on %s", vocab_size, source)
        train_tokenizer(source, tokenizer_dir, vocab_size=vocab_size)
    return load_tokenizer(tokenizer_dir)


def ensure_dataset(data_config: ml_collections.ConfigDict, source: Path, validation_fraction: float) -> None:
    """Builds `data_config.dataset` into `data_config.data_dir` from `source` unless it is built already."""
    try:
        pipeline.num_examples(data_config)
    except FileNotFoundError:
        log.info("building TFDS %s from %s into %s", data_config.dataset, source, data_config.data_dir)
        build_dataset(data_config.dataset.split("/")[-1], source, data_config.data_dir,
                      validation_fraction=validation_fraction)
