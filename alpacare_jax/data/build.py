"""Build a `medinstruct` TFDS dataset (array_record):

    alpacare-build-data --source=PATH_OR_URL --data_dir=DIR [--config=medinstruct_52k|medinstruct_test|icliniq]

`--source` is the MedInstruct-52k JSON (local path or URL; default: the official file) for
`medinstruct_52k`, and the AlpaCare data directory (or `MedInstruct-test.jsonl`) for the evaluation
configs. The dataset is written into a temporary directory inside DIR and renamed into place
(`DIR/medinstruct/<config>/<version>`) only when complete, so an interrupted build never leaves a
half-written dataset. An existing build is kept unless `--overwrite` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import tensorflow_datasets as tfds

from alpacare_jax.data.medinstruct import Builder
from alpacare_jax.data.medinstruct.medinstruct_dataset_builder import DEFAULT_VALIDATION_FRACTION

CONFIGS = ("medinstruct_52k", "medinstruct_test", "icliniq")
DATASET_NAME = "medinstruct"


def build_dataset(
    config: str,
    source: str | os.PathLike | None,
    data_dir: str | os.PathLike,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    skip_bad_records: bool = False,
    overwrite: bool = False,
) -> tuple[Path, dict[str, int], int]:
    """Builds one config; returns (dataset directory, examples per split, number of skipped records)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose one of {CONFIGS}")
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    version = str(Builder.VERSION)
    final = data_dir / DATASET_NAME / config / version
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass --overwrite to rebuild it")

    source = None if source is None else str(source)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=data_dir) as tmp:
        builder = Builder(config=config, data_dir=tmp, source=source, validation_fraction=validation_fraction,
                          skip_bad_records=skip_bad_records)
        builder.download_and_prepare(
            file_format="array_record",
            # Downloads are cached beside the datasets, outside the temporary directory.
            download_dir=str(data_dir / "downloads"),
            # Never look for a prebuilt copy on Google's servers: this dataset is built from `source`.
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
        splits = {name: info.num_examples for name, info in builder.info.splits.items()}
        built = Path(tmp) / DATASET_NAME / config / version
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # --overwrite: move the old build aside first so `final` is never half-replaced
            old = Path(tmp) / "previous"
            os.replace(final, old)
        os.replace(built, final)
    return final, splits, builder.num_skipped_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alpacare_jax.data.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=None,
                        help="MedInstruct-52k JSON path or URL (default: official URL), or the AlpaCare data "
                             "directory for medinstruct_test / icliniq")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
    parser.add_argument("--config", default="medinstruct_52k", choices=CONFIGS)
    parser.add_argument("--validation_fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
                        help="share of MedInstruct-52k tasks held out as the validation split")
    parser.add_argument("--skip_bad_records", action="store_true",
                        help="skip and count malformed records instead of stopping with an error")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
    args = parser.parse_args(argv)
    try:
        path, splits, skipped = build_dataset(
            args.config, args.source, args.data_dir, validation_fraction=args.validation_fraction,
            skip_bad_records=args.skip_bad_records, overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{name}={n}" for name, n in sorted(splits.items()))
    skipped_note = f" ({skipped} bad records skipped)" if skipped else ""
    print(f"built {DATASET_NAME}/{args.config} at {path}: {counts}{skipped_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
