"""Run many chat requests into an append-only store, live (asyncio workers) or via the Batch API.

A command describes its work as ``Job``s (a stable ``request_id`` plus the request body) and
a ``to_record`` function turning a finished completion into the record to store (or a
``Retry`` with a new body, e.g. more ``max_tokens`` for a truncated answer). This module
does the rest the same way for every command: skip ids already stored (resume; an
``is_done`` predicate may declare a stored record provisional, so it is requested again),
run with bounded concurrency, store each record the moment it is done, keep a side file
of the requests that are still failed (retried by the next run, never stored as results),
show progress, stop cleanly at the budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from .client import ClientConfig, Completion, LLMClient, RequestFailed
from .accounting import CostMeter
from .errors import BudgetExceeded, FatalAPIError
from .store import JsonlStore, read_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One request: ``body`` holds the kwargs of ``chat.completions.create``."""

    request_id: str
    body: dict
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Retry:
    """Returned by ``to_record`` to send the request again with another body."""

    body: dict


# to_record(job, completion, can_retry) -> record dict or Retry. ``job.body`` is the body that
# produced ``completion`` (after a Retry, the retried one), so a retry can grow from the last attempt.
ToRecord = Callable[[Job, Completion, bool], "dict | Retry"]
# is_done(stored record) -> False when the record is provisional and its request must be sent again
IsDone = Callable[[dict], bool]


def always_done(record: dict) -> bool:
    return True


@dataclass
class RunSummary:
    total: int = 0
    already_done: int = 0
    completed: int = 0
    failed: int = 0
    stopped_reason: str | None = None
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.stopped_reason is None and self.failed == 0

    def then(self, later: RunSummary) -> RunSummary:
        """This run followed by a round that asked some of its records again (a batch of re-asked verdicts)."""
        usage = {k: self.usage.get(k, 0) + later.usage.get(k, 0) for k in {*self.usage, *later.usage}}
        return RunSummary(total=self.total, already_done=self.already_done, completed=self.completed,
                          failed=later.failed, stopped_reason=later.stopped_reason,
                          seconds=self.seconds + later.seconds, usage=usage)

    def line(self) -> str:
        u = self.usage
        return (f"{self.completed} new, {self.already_done} already done, {self.failed} failed of {self.total}"
                f" in {self.seconds:.1f}s; {u.get('billed_requests', 0)} billed requests, "
                f"{u.get('prompt_tokens', 0)}+{u.get('completion_tokens', 0)} tokens, "
                f"${u.get('cost_usd', 0):.4f}, {u.get('retries', 0)} retries"
                + (f"; STOPPED: {self.stopped_reason}" if self.stopped_reason else ""))


@dataclass(frozen=True)
class RunSettings:
    """Options shared by every command that calls the API."""

    client: ClientConfig = field(default_factory=ClientConfig)
    max_cost: float | None = None
    price_in: float | None = None
    price_out: float | None = None
    batch_api: bool = False
    batch_poll_seconds: float = 30.0
    # Retry() rounds (e.g. doubling max_tokens), not HTTP retries: a safety bound only, since each
    # command's to_record stops retrying at its own cap; 8 doublings cover a 256x growth
    max_retries_per_job: int = 8
    progress: bool = True

    def meter(self) -> CostMeter:
        from .accounting import BATCH_DISCOUNT, Price
        override = Price(self.price_in or 0.0, self.price_out or 0.0) if (
            self.price_in is not None or self.price_out is not None) else None
        return CostMeter(max_cost=self.max_cost, price_override=override,
                         discount=BATCH_DISCOUNT if self.batch_api else 1.0)


class ErrorLog:
    """``<store>.errors.jsonl``: the requests that failed and are not done yet, retried by the next run.

    It lists what is still to do, not a history: ``prune`` (at the start and end of every run)
    drops the requests that a later run has since completed and keeps one line, the latest
    error, per request.
    """

    def __init__(self, store_path: Path):
        self.path = store_path.with_name(store_path.name + ".errors.jsonl")
        self.count = 0

    def write(self, request_id: str, error: str) -> None:
        self.count += 1
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"request_id": request_id, "error": error, "time": time.time()}) + "\n")

    def prune(self, done: Callable[[str], bool]) -> None:
        """Rewrite the file without the requests ``done`` says are finished (removed when none is left)."""
        if not self.path.exists():
            return
        latest = {e.get("request_id"): e for e in read_jsonl(self.path, allow_partial_tail=True)}
        keep = [e for rid, e in latest.items() if not (isinstance(rid, str) and done(rid))]
        if not keep:
            self.path.unlink()
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in keep), encoding="utf-8")
        os.replace(tmp, self.path)


def stored_and_done(store: JsonlStore, is_done: IsDone) -> Callable[[str], bool]:
    """Whether a request id has a final record in ``store``."""
    def done(request_id: str) -> bool:
        record = store.get(request_id)
        return record is not None and is_done(record)
    return done


def run_jobs(jobs: Sequence[Job], store: JsonlStore, to_record: ToRecord, settings: RunSettings,
             *, desc: str = "requests", is_done: IsDone = always_done) -> RunSummary:
    """Run every job without a final record in ``store``; returns what happened. Live or Batch API per settings.

    A record ``is_done`` rejects is sent again and its new record supersedes it (the store must
    be opened with ``superseding=True``).
    """
    ids = [j.request_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids are not unique")
    done = stored_and_done(store, is_done)
    pending = [j for j in jobs if not done(j.request_id)]
    if not store.superseding and any(j.request_id in store for j in pending):
        raise ValueError(f"{store.path}: provisional records need a store opened with superseding=True")
    summary = RunSummary(total=len(jobs), already_done=len(jobs) - len(pending))
    meter = settings.meter()
    errors = ErrorLog(store.path)
    errors.prune(done)  # a run killed before its end leaves entries its records have since made stale
    start = time.monotonic()
    try:
        if settings.batch_api:
            from .batch_api import run_batch
            run_batch(pending, store, to_record, settings, meter, summary, errors, desc=desc)
        else:
            asyncio.run(_run_live(pending, store, to_record, settings, meter, summary, errors, desc))
    finally:
        summary.seconds = time.monotonic() - start
        summary.usage = meter.summary()
        errors.prune(done)
    return summary


async def _run_live(pending: Sequence[Job], store: JsonlStore, to_record: ToRecord, settings: RunSettings,
                    meter: CostMeter, summary: RunSummary, errors: ErrorLog, desc: str) -> None:
    client = LLMClient(settings.client, meter)
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for j in pending:
        queue.put_nowait(j)
    bar = tqdm(total=len(pending), desc=desc, unit="req", disable=not settings.progress, dynamic_ncols=True)
    stop = asyncio.Event()

    async def worker() -> None:
        while not stop.is_set():
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                for round_ in range(settings.max_retries_per_job + 1):
                    completion = await client.chat(job.request_id, job.body)
                    out = to_record(job, completion, round_ < settings.max_retries_per_job)
                    if isinstance(out, Retry):
                        job = replace(job, body=out.body)  # the next to_record sees the body it answers
                        continue
                    store.append(out)
                    summary.completed += 1
                    break
            except BudgetExceeded as e:
                summary.stopped_reason = str(e)
                stop.set()
                return
            except FatalAPIError as e:
                summary.stopped_reason = f"fatal API error: {e}"
                stop.set()
                return
            except RequestFailed as e:
                summary.failed += 1
                errors.write(job.request_id, str(e))
            bar.update(1)
            bar.set_postfix(cost=f"${meter.spent:.4f}", retries=meter.retries, failed=summary.failed, refresh=False)

    try:
        workers = [asyncio.create_task(worker()) for _ in range(max(1, settings.client.concurrency))]
        await asyncio.gather(*workers)
    finally:
        bar.close()
        await client.close()
    if errors.count:
        log.warning("%d requests failed; see %s. Rerun the same command to retry them.", errors.count, errors.path)
