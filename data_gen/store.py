"""Append-only JSONL files keyed by a stable request id: the basis of crash-safe resume.

Every finished request becomes exactly one line, written and flushed as soon as the
request finishes. After a crash or SIGKILL the file holds every finished record, plus at
most one partly written last line; opening the store again cuts that partial line off
(and says so), reads the ids already done, and the command skips them. Nothing already
written is ever rewritten, so nothing finished is lost or billed twice.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import DataError

log = logging.getLogger(__name__)


def read_jsonl(path: str | Path, *, allow_partial_tail: bool = False) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file; a bad line raises ``DataError`` with its line number."""
    path = Path(path)
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_partial_tail and i == len(lines) - 1:
                return  # an unterminated last line: a write cut short by a crash
            raise DataError(path, i, None, f"line {i + 1} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(path, i, None, f"line {i + 1} is not a JSON object")
        yield obj


def read_records(path: str | Path) -> list[dict]:
    """Read a JSON list or a JSONL file of objects (the formats the commands accept)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"["):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise DataError(path, i, None, "expected a JSON object")
        return items
    return list(read_jsonl(path))


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write a JSON document via a temporary file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class JsonlStore:
    """An append-only JSONL file of records, each with a unique ``key_field``."""

    def __init__(self, path: str | Path, key_field: str = "request_id"):
        self.path = Path(path)
        self.key_field = key_field
        self.records: dict[str, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        if self.path.exists():
            for i, rec in enumerate(read_jsonl(self.path)):
                key = rec.get(key_field)
                if not isinstance(key, str):
                    raise DataError(self.path, i, key_field, "missing or not a string")
                if key in self.records:
                    raise DataError(self.path, i, key_field, f"duplicate id {key!r}")
                self.records[key] = rec
        self._f = self.path.open("a", encoding="utf-8")

    def _repair_tail(self) -> None:
        """Cut a partly written last line (left by a kill during a write)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a partly written last line (%d bytes) left by an interrupted run",
                        self.path, len(data) - cut)
            f.truncate(cut)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, record: dict) -> None:
        key = record[self.key_field]
        if key in self.records:
            raise ValueError(f"{self.path}: id {key!r} already stored")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()  # on disk for the OS once append returns: a SIGKILL cannot lose it
        self.records[key] = record

    def extend(self, records: Iterable[dict]) -> None:
        for r in records:
            self.append(r)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
