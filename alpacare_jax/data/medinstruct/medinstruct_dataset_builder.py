"""The `medinstruct` TFDS builder (array_record files, no TensorFlow needed).

Configs:
* `medinstruct_52k`: MedInstruct-52k JSON -> `train` and a held-out `validation` split (left out when
  no record falls into it, e.g. `validation_fraction=0`). A record goes to
  `validation` when a hash of its (instruction, input) falls below `validation_fraction`: the split is
  deterministic, stays put when records are added, and identical tasks never straddle the two splits.
* `medinstruct_test`: the 216 clinician-written MedInstruct-test tasks with the four reference answers
  -> `test`, in file order.
* `icliniq`: the 1000 iCliniq questions with the four reference answers -> `test`, in file order.

`source` (a local path, or for `medinstruct_52k` also a URL fetched by the TFDS download manager) is a
constructor argument because it changes between machines; `validation_fraction` is recorded in the
dataset's metadata.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from alpacare_jax.data import records as rec
from data_gen import DataError

MEDINSTRUCT_52K_URL = "https://raw.githubusercontent.com/XZhang97666/AlpaCare/master/data/MedInstruct-52k.json"
DEFAULT_VALIDATION_FRACTION = 0.02

_CITATION = """@article{zhang2023alpacare,
  title={AlpaCare: Instruction-tuned Large Language Models for Medical Application},
  author={Zhang, Xinlu and Tian, Chenxin and Yang, Xianjun and Chen, Lichang and Li, Zekun and Petzold, Linda Ruth},
  journal={arXiv preprint arXiv:2310.14558},
  year={2023}
}"""


def in_validation(instruction: str, input_text: str, fraction: float) -> bool:
    """Whether a task belongs to the held-out split: a stable hash of its text, not its position."""
    digest = hashlib.sha256(f"{instruction}\x00{input_text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _references_feature() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({m: tfds.features.Text() for m in rec.REFERENCE_MODELS})


class Builder(tfds.core.GeneratorBasedBuilder):
    """MedInstruct-52k, MedInstruct-test and iCliniq as TFDS datasets."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="medinstruct_52k", description="MedInstruct-52k instruction-response pairs."),
        tfds.core.BuilderConfig(name="medinstruct_test", description="MedInstruct-test with reference answers."),
        tfds.core.BuilderConfig(name="icliniq", description="iCliniq questions with reference answers."),
    ]
    DEFAULT_CONFIG_NAME = "medinstruct_52k"

    def __init__(
        self,
        *,
        source: str | None = None,
        validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
        skip_bad_records: bool = False,
        **kwargs,
    ):
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self._source = source
        self._validation_fraction = validation_fraction
        self._skip_bad_records = skip_bad_records
        self.num_skipped_records = 0
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        common = {"id": tfds.features.Scalar(dtype=np.int64), "instruction": tfds.features.Text(),
                  "input": tfds.features.Text()}
        if self.builder_config.name == "medinstruct_52k":
            text_fields = ("output", "type", "topic", "view", "difficulty")
            features = {**common, **{k: tfds.features.Text() for k in text_fields}}
            metadata = tfds.core.MetadataDict(validation_fraction=self._validation_fraction)
        elif self.builder_config.name == "medinstruct_test":
            features = {**common, "difficulty": tfds.features.Text(), "references": _references_feature()}
            metadata = None
        else:
            features = {**common, "references": _references_feature()}
            metadata = None
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/XZhang97666/AlpaCare",
            citation=_CITATION,
            metadata=metadata,
            # The evaluation sets keep file order so that record i is row i of the release files.
            disable_shuffling=self.builder_config.name != "medinstruct_52k",
        )

    def _resolve_source(self, dl_manager: tfds.download.DownloadManager) -> Path:
        source = self._source
        if source is None:
            if self.builder_config.name != "medinstruct_52k":
                raise ValueError(f"config {self.builder_config.name!r} needs a source: the AlpaCare data directory")
            source = MEDINSTRUCT_52K_URL
        if str(source).startswith(("http://", "https://")):
            return Path(dl_manager.download(source))
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: source not found")
        return path

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source = self._resolve_source(dl_manager)
        name = self.builder_config.name
        if name == "medinstruct_52k":
            records, skipped = rec.read_medinstruct_52k(source, skip_bad_records=self._skip_bad_records)
            train, validation = [], []
            for r in records:
                held_out = in_validation(r["instruction"], r["input"], self._validation_fraction)
                (validation if held_out else train).append(r)
            # TFDS cannot write an empty split: a source too small (or a fraction of 0) gives no validation.
            splits = {"train": train, "validation": validation} if validation else {"train": train}
        else:
            reader = rec.read_medinstruct_test if name == "medinstruct_test" else rec.read_icliniq
            records, skipped = reader(source, skip_bad_records=self._skip_bad_records)
            splits = {"test": records}
        self.num_skipped_records = skipped
        # TFDS would fail later with a bare "No examples were yielded"; say which file and why.
        if not records:
            raise DataError(source, None, None, f"all {skipped} records are bad and were skipped"
                            if skipped else "holds no records")
        if not next(iter(splits.values())):
            raise DataError(source, None, None, f"all {len(records)} records fall into the validation "
                            f"split (validation_fraction={self._validation_fraction}): none left to train on")
        return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows: list[dict]):
        # Keys are positions, not ids: ids in user files need not be unique.
        yield from enumerate(rows)
