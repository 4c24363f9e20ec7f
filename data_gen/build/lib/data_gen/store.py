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


def check_input_file(path: str | Path) -> Path:
    """``path`` as a readable file, or a one-line ``DataError`` (not a traceback) saying why not."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, None, "is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise DataError(path, None, None, "not readable (permission denied)")
    return path


def decode_utf8(path: object, raw: bytes, *, record: int | None = None) -> str:
    """`raw` (a whole JSON file, or one JSONL line when `record` is given) as text.

    Invalid UTF-8 raises a `DataError` naming the record and field that hold the
    bad bytes, found by parsing the text with the bad bytes kept as lone surrogates (Python's
    "surrogateescape"): a codec message with a byte offset alone does not say which record to fix.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_byte = e.start
    problem = f"invalid UTF-8 (byte 0x{raw[bad_byte]:02x})"
    try:
        parsed = json.loads(raw.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError:
        raise DataError(path, record, None, f"{problem} at byte {bad_byte}") from None
    if isinstance(parsed, list) and record is None:
        record = next((i for i, item in enumerate(parsed) if _undecodable(item)), None)
        parsed = parsed[record] if record is not None else None
    field = next((k for k, v in parsed.items() if _undecodable(k) or _undecodable(v)), None) \
        if isinstance(parsed, dict) else None
    raise DataError(path, record, field, problem) from None


def _undecodable(value: object) -> bool:
    """Whether `value` holds a byte that was not UTF-8 (kept as a surrogate U+DC80..U+DCFF)."""
    return any("\udc80" <= c <= "\udcff" for c in json.dumps(value, ensure_ascii=False))


def read_jsonl_numbered(path: str | Path, *, allow_partial_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """``(0-based line number, object)`` of each non-blank line of a JSONL file; a bad line raises
    ``DataError`` with its line number."""
    path = check_input_file(path)
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(decode_utf8(path, line, record=i))
        except json.JSONDecodeError as e:
            if allow_partial_tail and i == len(lines) - 1:
                return  # an unterminated last line: a write cut short by a crash
            raise DataError(path, i, None, f"line {i + 1} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(path, i, None, f"line {i + 1} is not a JSON object")
        yield i, obj


def read_jsonl(path: str | Path, *, allow_partial_tail: bool = False) -> Iterator[dict]:
    """Yield the JSON objects of a JSONL file; a bad line raises ``DataError`` with its line number."""
    for _line, obj in read_jsonl_numbered(path, allow_partial_tail=allow_partial_tail):
        yield obj


def read_records(path: str | Path) -> list[dict]:
    """Read a JSON list or a JSONL file of objects (the formats the commands accept)."""
    path = check_input_file(path)
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"["):
        try:
            items = json.loads(decode_utf8(path, path.read_bytes()))
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
    """An append-only JSONL file of records, each with a unique ``key_field``.

    With ``superseding=True`` a record may be replaced by appending a newer one with the same
    id (the last line wins when reading). Stores whose records can be provisional use it: a
    judge verdict cut off by ``max_tokens`` is kept as evidence but re-requested, and its
    answer supersedes it without rewriting the file.
    """

    def __init__(self, path: str | Path, key_field: str = "request_id", *, superseding: bool = False):
        self.path = Path(path)
        self.key_field = key_field
        self.superseding = superseding
        self.records: dict[str, dict] = {}
        if self.path.is_dir():
            raise DataError(self.path, None, None, "is a directory, expected a file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(self.path, None, None, f"cannot create its folder ({e.strerror})") from None
        self._repair_tail()
        if self.path.exists():
            for i, rec in enumerate(read_jsonl(self.path)):
                key = rec.get(key_field)
                if not isinstance(key, str):
                    raise DataError(self.path, i, key_field, "missing or not a string")
                if key in self.records and not superseding:
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
        """Store ``record``; replacing a stored id needs ``superseding=True``."""
        key = record[self.key_field]
        if key in self.records and not self.superseding:
            raise ValueError(f"{self.path}: id {key!r} already stored")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()  # on disk for the OS once append returns: a SIGKILL cannot lose it
        self.records[key] = record

    def extend(self, records: Iterable[dict]) -> None:
        for r in records:
            self.append(r)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
