"""Errors that carry where the bad input is (file, record index, field)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file, the record index and the field."""

    def __init__(self, path: object, index: int | None, field: str | None, problem: str):
        where = f"{path}"
        if index is not None:
            where += f", record {index}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")
        self.path, self.index, self.field = path, index, field


class BudgetExceeded(RuntimeError):
    """The ``--max-cost`` budget would be exceeded by the next request."""


class FatalAPIError(RuntimeError):
    """An error retrying cannot fix (bad key, unknown model): the run stops."""
