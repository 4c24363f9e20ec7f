"""Reading and checking the AlpaCare source files before they become a TFDS dataset.

Three sources, three schemas:

* MedInstruct-52k (and the bundled sample, and `data_gen responses` output): a JSON list of
  `{instruction, input, output, type, topic, view, difficulty}`; `input` is `<noinput>` when absent.
* MedInstruct-test: JSON lines `{id, instruction, difficulty, gpt-4-answer, gpt-3.5-turbo-answer,
  text-davinci-003-answer, claude-2}` (216 clinician-written tasks with four reference answers).
* iCliniq: one `reference_outputs/<model>/iCliniq_output.jsonl` per reference model, 1000 rows each,
  in the same order but with different schemas (`{instruction, input, output}` for the OpenAI models,
  `{prompt, response}` for claude-2, whose prompt wraps the patient's question). They are joined
  into one record per question with every model's answer.

A bad record stops the build with a `DataError` (data_gen's, the one error type for a bad record in a
file) naming the file, the record index and the field, or, with `skip_bad_records=True`, is left out and
counted. Every reader returns `(records, num_skipped)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alpacare_jax.data.prompts import ICLINIQ_INSTRUCTION
from data_gen import DataError, decode_utf8, parse_claude_prompt

# Reference models of the AlpaCare evaluation, in the order the paper reports them.
REFERENCE_MODELS = ("gpt-4", "gpt-3.5-turbo", "text-davinci-003", "claude-2")
# Where MedInstruct-test.jsonl keeps each reference model's answer.
TEST_ANSWER_KEYS = {
    "gpt-4": "gpt-4-answer",
    "gpt-3.5-turbo": "gpt-3.5-turbo-answer",
    "text-davinci-003": "text-davinci-003-answer",
    "claude-2": "claude-2",
}
MEDINSTRUCT_TEST_FILE = "MedInstruct-test.jsonl"
ICLINIQ_FILE = "iCliniq_output.jsonl"

# Optional text fields of MedInstruct-52k records; missing ones become "".
MEDINSTRUCT_OPTIONAL_FIELDS = ("input", "type", "topic", "view", "difficulty")


class _Checker:
    """Collects records; a bad one raises a DataError, or is counted when `skip_bad_records`."""

    def __init__(self, path: Path, skip_bad_records: bool):
        self.path, self.skip_bad_records, self.num_skipped = path, skip_bad_records, 0

    def text(self, record: Any, index: int, field: str, *, required: bool, numeric_ok: bool = False) -> str:
        if not isinstance(record, dict):
            raise DataError(self.path, index, None, f"expected a JSON object, got {type(record).__name__}")
        if field not in record or record[field] is None:
            if required:
                raise DataError(self.path, index, field, "missing")
            return ""
        value = record[field]
        if numeric_ok and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise DataError(self.path, index, field, f"expected a string, got {type(value).__name__}")
        return value

    def run(self, items, make):
        """`make(index, item)` for every item; DataErrors raise or are counted."""
        out = []
        for index, item in enumerate(items):
            try:
                out.append(make(index, item))
            except DataError:
                if not self.skip_bad_records:
                    raise
                self.num_skipped += 1
        return out


def _load_json_list(path: Path) -> list:
    try:
        data = json.loads(decode_utf8(path, path.read_bytes()))
    except json.JSONDecodeError as e:
        raise DataError(path, None, None, f"not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(path, None, None, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _load_json_lines(path: Path) -> list:
    records = []
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            if not raw.strip():
                continue
            line = decode_utf8(path, raw, record=len(records))
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(path, len(records), None, f"line {index + 1} is not valid JSON ({e})") from None
    return records


def _record_id(record: dict, index: int, path: Path) -> int:
    """The record's own integer `id` when it has one, else its position in the file."""
    value = record.get("id", index)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(path, index, "id", f"expected an integer, got {type(value).__name__}")
    return value


def read_medinstruct_52k(path: str | Path, *, skip_bad_records: bool = False) -> tuple[list[dict], int]:
    """Records `{id, instruction, input, output, type, topic, view, difficulty}` of a MedInstruct-52k JSON.

    `instruction` and `output` must be strings; optional fields default to "" (`difficulty` may be an
    integer and becomes its string). Fields outside the schema are ignored.
    """
    path = Path(path)
    check = _Checker(path, skip_bad_records)

    def make(index: int, record: Any) -> dict:
        out = {
            "instruction": check.text(record, index, "instruction", required=True),
            "output": check.text(record, index, "output", required=True),
        }
        for field in MEDINSTRUCT_OPTIONAL_FIELDS:
            out[field] = check.text(record, index, field, required=False, numeric_ok=field == "difficulty")
        out["id"] = _record_id(record, index, path)
        return out

    records = check.run(_load_json_list(path), make)
    return records, check.num_skipped


def _find(source: Path, name: str) -> Path:
    """`source` itself when it is the file, else `name` inside the directory `source`."""
    if source.is_file():
        return source
    if (source / name).is_file():
        return source / name
    raise FileNotFoundError(f"{source}: expected the file {name} or a directory containing it")


def read_medinstruct_test(source: str | Path, *, skip_bad_records: bool = False) -> tuple[list[dict], int]:
    """Records `{id, instruction, input, difficulty, references: {model: answer}}` of MedInstruct-test.

    `source` is `MedInstruct-test.jsonl` or the AlpaCare data directory holding it.
    """
    path = _find(Path(source), MEDINSTRUCT_TEST_FILE)
    check = _Checker(path, skip_bad_records)

    def make(index: int, record: Any) -> dict:
        out = {
            "instruction": check.text(record, index, "instruction", required=True),
            "input": check.text(record, index, "input", required=False),
            "difficulty": check.text(record, index, "difficulty", required=False, numeric_ok=True),
            "references": {
                model: check.text(record, index, key, required=True) for model, key in TEST_ANSWER_KEYS.items()
            },
        }
        out["id"] = _record_id(record, index, path)
        return out

    records = check.run(_load_json_lines(path), make)
    return records, check.num_skipped


def _icliniq_dir(source: Path) -> Path:
    for candidate in (source / "reference_outputs", source):
        if all((candidate / m / ICLINIQ_FILE).is_file() for m in REFERENCE_MODELS):
            return candidate
    raise FileNotFoundError(
        f"{source}: expected <model>/{ICLINIQ_FILE} for models {list(REFERENCE_MODELS)} in this directory "
        "or in its reference_outputs/ subdirectory"
    )


def read_icliniq(source: str | Path, *, skip_bad_records: bool = False) -> tuple[list[dict], int]:
    """Records `{id, instruction, input, references: {model: answer}}`, one per iCliniq question.

    `source` is the AlpaCare data directory (or its `reference_outputs/`). Row i of every model's file
    answers question i; the question is each file's `input` (claude-2: the text inside its `prompt`),
    and the files must agree on it up to surrounding whitespace. `instruction` is the instruction the
    files carry, or AlpaCare's iCliniq instruction where they leave it empty, as they all do.
    """
    root = _icliniq_dir(Path(source))
    per_model = {m: _load_json_lines(root / m / ICLINIQ_FILE) for m in REFERENCE_MODELS}
    lengths = {m: len(rows) for m, rows in per_model.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(root, None, None, f"reference files have different numbers of rows: {lengths}")
    checkers = {m: _Checker(root / m / ICLINIQ_FILE, skip_bad_records) for m in REFERENCE_MODELS}

    def question_and_answer(model: str, index: int) -> tuple[str, str, str]:
        check, record = checkers[model], per_model[model][index]
        answer_key = "response" if isinstance(record, dict) and "response" in record else "output"
        answer = check.text(record, index, answer_key, required=True)
        if "prompt" in record and "input" not in record:
            parsed = parse_claude_prompt(check.text(record, index, "prompt", required=True))
            if parsed is None or parsed[0] != ICLINIQ_INSTRUCTION:
                raise DataError(check.path, index, "prompt",
                                "not in the expected 'Human: <iCliniq instruction>\n\n<question>\nAssistant:' form")
            return "", parsed[1], answer
        instruction = check.text(record, index, "instruction", required=False)
        return instruction, check.text(record, index, "input", required=True), answer

    def make(index: int, _) -> dict:
        parts = {m: question_and_answer(m, index) for m in REFERENCE_MODELS}
        instruction, question, _ = parts[REFERENCE_MODELS[0]]
        for model, (_, other, _) in parts.items():
            if other.strip() != question.strip():
                raise DataError(checkers[model].path, index, "input",
                                  f"question differs from {REFERENCE_MODELS[0]}'s row {index}")
        return {
            "id": index,
            "instruction": instruction or ICLINIQ_INSTRUCTION,
            "input": question,
            "references": {m: answer for m, (_, _, answer) in parts.items()},
        }

    records = _Checker(root, skip_bad_records).run(range(lengths[REFERENCE_MODELS[0]]), make)
    return records, len(per_model[REFERENCE_MODELS[0]]) - len(records)
