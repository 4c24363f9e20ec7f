"""Bad input through the real commands: one line on stderr that names the file, record and field, a non-zero
exit, and no traceback. Covers data files (build, training bootstrap), generate's task files and HF model
directories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOOD = {"instruction": "Name a fat-soluble vitamin.", "input": "<noinput>", "output": "Vitamin D."}


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *expected: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in last, last


def _with_invalid_utf8(path: Path, records: list[dict], *, jsonl: bool = False) -> Path:
    """`records` as JSON (or JSONL) with the byte 0xff put inside record 1's `output`."""
    text = "\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records, indent=1)
    marker = "BAD-BYTE-HERE"
    path.write_bytes(text.encode().replace(marker.encode(), b"Vitamin \xff"))
    return path


@pytest.fixture
def bad_utf8_json(tmp_path) -> Path:
    return _with_invalid_utf8(tmp_path / "bad.json", [GOOD, {**GOOD, "output": "BAD-BYTE-HERE"}, GOOD])


def test_build_names_the_record_and_field_of_invalid_utf8(bad_utf8_json, tmp_path):
    proc = _run("alpacare_jax.data.build", f"--source={bad_utf8_json}", f"--data_dir={tmp_path / 'tfds'}")
    _assert_one_line_error(proc, str(bad_utf8_json), "record 1", "field 'output'", "invalid UTF-8 (byte 0xff)")


def test_build_refuses_empty_and_all_skipped_files(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    proc = _run("alpacare_jax.data.build", f"--source={empty}", f"--data_dir={tmp_path / 'a'}")
    _assert_one_line_error(proc, str(empty), "holds no records")
    assert "No examples were yielded" not in proc.stderr

    all_bad = tmp_path / "all_bad.json"
    all_bad.write_text(json.dumps([{"instruction": "a"}, {"output": "b"}]))
    proc = _run("alpacare_jax.data.build", f"--source={all_bad}", f"--data_dir={tmp_path / 'b'}", "--skip_bad_records")
    _assert_one_line_error(proc, str(all_bad), "all 2 records are bad")
    assert "No examples were yielded" not in proc.stderr


@pytest.mark.parametrize("case", ["invalid_utf8", "empty", "missing_field"])
def test_training_bootstrap_prints_one_line(case, bad_utf8_json, tmp_path):
    if case == "invalid_utf8":
        source, expected = bad_utf8_json, ("record 1", "field 'output'", "invalid UTF-8")
    elif case == "empty":
        source, expected = tmp_path / "empty.json", ("is empty: no text to train on",)
        source.write_text("[]")
    else:
        source, expected = tmp_path / "missing.json", ("record 1", "field 'instruction'", "missing")
        source.write_text(json.dumps([GOOD, {"output": "x"}]))
    proc = _run("alpacare_jax.train", f"--config={REPO_ROOT / 'configs' / 'demo.py'}", f"--workdir={tmp_path / 'w'}",
                f"--config.bootstrap.source={source}")
    _assert_one_line_error(proc, str(source), *expected)


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_generate_names_the_record_and_field_of_invalid_utf8(jsonl, tmp_path):
    tasks = [{"instruction": "a"}, {"instruction": "b", "output": "BAD-BYTE-HERE"}]
    path = _with_invalid_utf8(tmp_path / ("tasks.jsonl" if jsonl else "tasks.json"), tasks, jsonl=jsonl)
    proc = _run("alpacare_jax.infer.generate", "--model=unused", f"--dataset={path}", f"--out={tmp_path / 'o.json'}")
    _assert_one_line_error(proc, str(path), "record 1", "field 'output'", "invalid UTF-8", code=2)


def test_generate_refuses_an_empty_dataset_file(tmp_path):
    for name, text in (("empty.json", "[]"), ("empty.jsonl", "")):
        path = tmp_path / name
        path.write_text(text)
        out = tmp_path / "o.json"
        proc = _run("alpacare_jax.infer.generate", "--model=unused", f"--dataset={path}", f"--out={out}")
        _assert_one_line_error(proc, str(path), "holds no tasks", code=2)
        assert not out.exists()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from tests.hf_fixtures import make_hf_model, save_hf

    return save_hf(make_hf_model("multi_head"), tmp_path_factory.mktemp("hf") / "model")


def _damaged_copy(hf_dir: Path, tmp_path: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(hf_dir, model)
    weights, config = model / "model.safetensors", model / "config.json"
    if case == "truncated_safetensors":
        weights.write_bytes(weights.read_bytes()[:100])
        return model, (str(weights), "not a readable safetensors file")
    if case == "garbage_safetensors":
        weights.write_bytes(os.urandom(weights.stat().st_size))
        return model, (str(weights), "not a readable safetensors file")
    if case == "config_missing_field":
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "hidden_size"}))
        return model, (str(config), "field 'hidden_size' is missing")
    config.write_text(config.read_text()[:-10])  # invalid JSON
    return model, (str(config), "not valid JSON")


@pytest.mark.parametrize("case", ["truncated_safetensors", "garbage_safetensors", "config_missing_field",
                                  "invalid_config_json"])
def test_generate_reports_a_damaged_hf_directory_in_one_line(case, hf_dir, tmp_path):
    model, expected = _damaged_copy(hf_dir, tmp_path, case)
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"instruction": "a"}]))
    proc = _run("alpacare_jax.infer.generate", f"--model={model}", f"--dataset={tasks}", f"--out={tmp_path / 'o.json'}")
    _assert_one_line_error(proc, *expected)


def test_invalid_utf8_in_a_file_that_is_not_json_either(tmp_path):
    """Bytes that are neither UTF-8 nor JSON: the error names the file and the byte offset of the bad byte."""
    from data_gen.errors import DataError
    from data_gen.store import read_records

    path = tmp_path / "broken.json"
    path.write_bytes(b'[{"instruction": "x\xff"')
    with pytest.raises(DataError, match=r"broken\.json: invalid UTF-8 \(byte 0xff\) at byte 19"):
        read_records(path)
