"""The `medinstruct` TFDS builder on the real AlpaCare release files and on the bundled sample."""

import json
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from alpacare_jax.data.build import build_dataset
from alpacare_jax.data.medinstruct.medinstruct_dataset_builder import in_validation
from alpacare_jax.data.prompts import ICLINIQ_INSTRUCTION
from alpacare_jax.data.records import REFERENCE_MODELS, TEST_ANSWER_KEYS, read_medinstruct_52k
from data_gen import DataError

from .conftest import REPO_ROOT, SAMPLE_JSON, SAMPLE_VALIDATION_FRACTION


def _text(value: bytes) -> str:
    return value.decode("utf-8")


@pytest.fixture(scope="module")
def eval_data_dir(tmp_path_factory, alpacare_data):
    data_dir = tmp_path_factory.mktemp("eval_tfds")
    build_dataset("medinstruct_test", alpacare_data, data_dir)
    build_dataset("icliniq", alpacare_data, data_dir)
    return data_dir


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_medinstruct_test_keeps_all_216_rows_in_order_with_four_references(eval_data_dir, alpacare_data):
    source = _jsonl(alpacare_data / "MedInstruct-test.jsonl")
    ds = tfds.data_source("medinstruct/medinstruct_test", split="test", data_dir=eval_data_dir, download=False)
    assert len(ds) == len(source) == 216
    for row, src in zip(ds, source):
        assert row["id"] == src["id"]
        assert _text(row["instruction"]) == src["instruction"]
        assert _text(row["difficulty"]) == src["difficulty"]
        assert _text(row["input"]) == ""
        for model, key in TEST_ANSWER_KEYS.items():
            assert _text(row["references"][model]) == src[key]


def test_icliniq_joins_the_four_differently_shaped_reference_files(eval_data_dir, alpacare_data):
    files = {m: _jsonl(alpacare_data / "reference_outputs" / m / "iCliniq_output.jsonl") for m in REFERENCE_MODELS}
    assert {len(rows) for rows in files.values()} == {1000}
    ds = tfds.data_source("medinstruct/icliniq", split="test", data_dir=eval_data_dir, download=False)
    assert len(ds) == 1000
    for i, row in enumerate(ds):
        assert row["id"] == i
        assert _text(row["instruction"]) == ICLINIQ_INSTRUCTION
        question = _text(row["input"])
        assert question == files["gpt-4"][i]["input"]
        assert question.strip() in files["claude-2"][i]["prompt"]
        assert _text(row["references"]["claude-2"]) == files["claude-2"][i]["response"]
        for model in ("gpt-4", "gpt-3.5-turbo", "text-davinci-003"):
            assert _text(row["references"][model]) == files[model][i]["output"]


def test_medinstruct_52k_split_is_deterministic_disjoint_and_complete(sample_data_dir):
    records, skipped = read_medinstruct_52k(SAMPLE_JSON)
    assert skipped == 0 and len(records) >= 100
    splits = {s: tfds.data_source("medinstruct/medinstruct_52k", split=s, data_dir=sample_data_dir, download=False)
              for s in ("train", "validation")}
    ids = {s: sorted(int(r["id"]) for r in ds) for s, ds in splits.items()}
    assert not set(ids["train"]) & set(ids["validation"])
    assert sorted(ids["train"] + ids["validation"]) == list(range(len(records)))
    expected_validation = [r["id"] for r in records
                           if in_validation(r["instruction"], r["input"], SAMPLE_VALIDATION_FRACTION)]
    assert ids["validation"] == expected_validation and 0 < len(expected_validation) < len(records)
    # Every field of the source survives the build.
    row = next(r for r in splits["train"] if int(r["id"]) == ids["train"][0])
    src = records[ids["train"][0]]
    for field in ("instruction", "input", "output", "type", "topic", "view", "difficulty"):
        assert _text(row[field]) == src[field]
    info = tfds.builder_from_directory(str(sample_data_dir / "medinstruct/medinstruct_52k/1.0.0")).info
    assert info.metadata["validation_fraction"] == SAMPLE_VALIDATION_FRACTION


BAD_RECORDS = [
    ("not an object", ["just a string"], r"record 1: expected a JSON object, got str"),
    ("missing instruction", [{"output": "x"}], r"record 1, field 'instruction': missing"),
    ("missing output", [{"instruction": "x"}], r"record 1, field 'output': missing"),
    ("non-string field", [{"instruction": "x", "output": "y", "topic": 3}],
     r"record 1, field 'topic': expected a string, got int"),
]


@pytest.mark.parametrize("bad", [b[1] for b in BAD_RECORDS], ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_stops_the_build_naming_file_index_and_field(tmp_path, bad):
    message = dict((json.dumps(b[1]), b[2]) for b in BAD_RECORDS)[json.dumps(bad)]
    source = tmp_path / "bad.json"
    source.write_text(json.dumps([{"instruction": "ok", "output": "fine", "input": "<noinput>"}] + bad))
    with pytest.raises(DataError, match=f"{source}, {message}"):
        build_dataset("medinstruct_52k", source, tmp_path / "tfds")
    # Nothing half-built is left behind.
    assert not (tmp_path / "tfds" / "medinstruct" / "medinstruct_52k").exists()
    assert not list((tmp_path / "tfds").glob(".build-*"))

    path, splits, skipped = build_dataset("medinstruct_52k", source, tmp_path / "tfds", skip_bad_records=True)
    assert skipped == 1 and sum(splits.values()) == 1 and path.is_dir()


def test_existing_build_is_kept_unless_overwrite(tmp_path):
    source = tmp_path / "one.json"
    source.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    build_dataset("medinstruct_52k", source, tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_dataset("medinstruct_52k", source, tmp_path)
    source.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    _, splits, _ = build_dataset("medinstruct_52k", source, tmp_path, overwrite=True)
    assert sum(splits.values()) == 2


def test_cli_builds_and_reports_errors(tmp_path):
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "alpacare_jax.data.build", *args], capture_output=True, text=True, cwd=REPO_ROOT,
        timeout=120,
    )
    ok = run(f"--source={SAMPLE_JSON}", f"--data_dir={tmp_path}", "--config=medinstruct_52k")
    assert ok.returncode == 0, ok.stderr
    assert "built medinstruct/medinstruct_52k" in ok.stdout and "train=" in ok.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": ["not", "text"]}]))
    failed = run(f"--source={bad}", f"--data_dir={tmp_path / 'other'}")
    assert failed.returncode == 1
    assert f"{bad}, record 0, field 'output': expected a string, got list" in failed.stderr


def test_builder_import_has_no_side_effects(tmp_path):
    code = "import alpacare_jax.data.medinstruct, os; print(sorted(os.listdir('.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"PYTHONPATH": str(REPO_ROOT), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
