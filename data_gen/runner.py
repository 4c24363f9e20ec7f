"""Run many chat requests into an append-only store, live (asyncio workers) or via the Batch API.

A command describes its work as ``Job``s (a stable ``request_id`` plus the request body) and
a ``to_record`` function turning a finished completion into the record to store (or a
``Retry`` with a new body, e.g. more ``max_tokens`` for a truncated answer). This module
does the rest the same way for every command: skip ids already stored (resume), run with
bounded concurrency, store each record the moment it is done, log failures to a side file
(they are retried by the next run, never stored as results), show progress, stop cleanly
at the budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .client import ClientConfig, Completion, LLMClient, RequestFailed
from .accounting import CostMeter
from .errors import BudgetExceeded, FatalAPIError
from .store import JsonlStore

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


# to_record(job, completion, can_retry) -> record dict or Retry
ToRecord = Callable[[Job, Completion, bool], "dict | Retry"]


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
    max_retries_per_job: int = 3  # Retry() rounds (e.g. more max_tokens), not HTTP retries
    progress: bool = True

    def meter(self) -> CostMeter:
        from .accounting import BATCH_DISCOUNT, Price
        override = Price(self.price_in or 0.0, self.price_out or 0.0) if (
            self.price_in is not None or self.price_out is not None) else None
        return CostMeter(max_cost=self.max_cost, price_override=override,
                         discount=BATCH_DISCOUNT if self.batch_api else 1.0)


class ErrorLog:
    """Failed requests go to ``<store>.errors.jsonl``: visible, and retried by the next run."""

    def __init__(self, store_path: Path):
        self.path = store_path.with_name(store_path.name + ".errors.jsonl")
        self.count = 0

    def write(self, request_id: str, error: str) -> None:
        self.count += 1
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"request_id": request_id, "error": error, "time": time.time()}) + "\n")


def run_jobs(jobs: Sequence[Job], store: JsonlStore, to_record: ToRecord, settings: RunSettings,
             *, desc: str = "requests") -> RunSummary:
    """Run every job not yet in ``store``; returns what happened. Live or Batch API per settings."""
    ids = [j.request_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids are not unique")
    pending = [j for j in jobs if j.request_id not in store]
    summary = RunSummary(total=len(jobs), already_done=len(jobs) - len(pending))
    meter = settings.meter()
    start = time.monotonic()
    try:
        if settings.batch_api:
            from .batch_api import run_batch
            run_batch(pending, store, to_record, settings, meter, summary, desc=desc)
        else:
            asyncio.run(_run_live(pending, store, to_record, settings, meter, summary, desc))
    finally:
        summary.seconds = time.monotonic() - start
        summary.usage = meter.summary()
    return summary


async def _run_live(pending: Sequence[Job], store: JsonlStore, to_record: ToRecord, settings: RunSettings,
                    meter: CostMeter, summary: RunSummary, desc: str) -> None:
    client = LLMClient(settings.client, meter)
    errors = ErrorLog(store.path)
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
            body = job.body
            try:
                for round_ in range(settings.max_retries_per_job + 1):
                    completion = await client.chat(job.request_id, body)
                    out = to_record(job, completion, round_ < settings.max_retries_per_job)
                    if isinstance(out, Retry):
                        body = out.body
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
