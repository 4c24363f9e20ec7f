"""Errors that carry where the bad input is (file, record index, field), or why a result is not final."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file, the record index and the field.

    The one error type for a bad record in a file, here and in the packages that read files through data_gen.
    """

    def __init__(self, path: object, index: int | None, field: str | None, problem: str):
        where = f"{path}"
        if index is not None:
            where += f", record {index}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {problem}")
        self.path, self.index, self.field = path, index, field


class BudgetExceeded(RuntimeError):
    """The ``--max_cost`` budget would be exceeded by the next request."""


class FatalAPIError(RuntimeError):
    """An error retrying cannot fix (bad key, unknown model): the run stops."""


class JudgeIncomplete(RuntimeError):
    """Win rates that must not be taken as final; ``status`` is the exit status the command ends with.

    1: unfinished (failed requests, budget) or a comparison without a single scored verdict;
    3: reference examples (or whole reference files) that the model outputs do not answer.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
