"""Run many chat requests into an append-only store, live (asyncio workers) or via the Batch API.

A command describes its work as ``Job``s (a stable ``request_id`` plus the request body) and
a ``to_record`` function turning a finished completion into the record to store. This
module does the rest the same way for every command: skip ids already stored (resume), run
with bounded concurrency, store each record the moment it is done, keep a side file of the
requests that are still failed (retried by the next run, never stored as results), show
progress, stop cleanly at the budget (one cost meter for the whole run, every round of it).

Commands whose replies can be cut off by ``max_tokens`` pass a ``MaxTokensGrowth``: a reply
with ``finish_reason == "length"`` is asked again with twice the tokens, up to a cap. Live,
that happens at once; with the Batch API each doubling is another batch round. A truncated
record asked below the cap is provisional: it is stored at once (so a budget stop or a kill
before the next size loses nothing already paid for), and the next attempt, in this run or a
later one, supersedes it. Raising the cap makes records cut at the old cap provisional again.
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

from .accounting import BATCH_DISCOUNT, CostMeter, Price
from .client import ClientConfig, Completion, LLMClient, RequestFailed
from .errors import BudgetExceeded, FatalAPIError
from .store import JsonlStore, read_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One request: ``body`` holds the kwargs of ``chat.completions.create``."""

    request_id: str
    body: dict
    meta: dict = field(default_factory=dict)


# to_record(job, completion) -> the record to store. ``job.body`` is the body that produced ``completion``
# (after a doubling, the doubled one), so the record can say which ``max_tokens`` it was asked with.
ToRecord = Callable[[Job, Completion], dict]


def is_truncated(record: dict) -> bool:
    """A reply cut off by ``max_tokens``."""
    return record.get("finish_reason") == "length"


@dataclass(frozen=True)
class MaxTokensGrowth:
    """Replies cut off by ``max_tokens`` are asked again with twice the tokens, up to ``cap``.

    Records must hold the reply's ``finish_reason`` and the ``max_tokens`` it was asked with.
    A truncated record is final only once it was asked with ``cap``: raising the cap later, or a
    record of an older version without ``max_tokens``, makes it provisional again.
    """

    cap: int

    def is_final(self, record: dict) -> bool:
        return not is_truncated(record) or int(record.get("max_tokens") or 0) >= self.cap

    def doubled(self, max_tokens: int) -> int:
        return min(self.cap, 2 * max_tokens)

    def resumed(self, job: Job, record: dict | None) -> Job:
        """``job`` as a rerun sends it: past a provisional record, with twice the tokens it was cut at."""
        if record is None or not is_truncated(record) or not record.get("max_tokens"):
            return job
        start = max(int(job.body["max_tokens"]), self.doubled(int(record["max_tokens"])))
        return replace(job, body={**job.body, "max_tokens": start})


@dataclass
class RunSummary:
    total: int = 0
    already_done: int = 0
    completed: int = 0
    failed: int = 0
    provisional: int = 0  # records cut off below the max_tokens cap when the run ended: a rerun asks them
    stopped_reason: str | None = None
    seconds: float = 0.0
    usage: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.stopped_reason is None and self.failed == 0 and self.provisional == 0

    def line(self) -> str:
        u = self.usage
        return (f"{self.completed} new, {self.already_done} already done, {self.failed} failed of {self.total}"
                f" in {self.seconds:.1f}s; {u.get('billed_requests', 0)} billed requests, "
                f"{u.get('prompt_tokens', 0)}+{u.get('completion_tokens', 0)} tokens, "
                f"${u.get('cost_usd', 0):.4f}, {u.get('retries', 0)} retries"
                + (f"; {self.provisional} cut off below the max_tokens cap (a rerun asks them again)"
                   if self.provisional else "")
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
    progress: bool = True

    def meter(self) -> CostMeter:
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


def stored_and_final(store: JsonlStore, growth: MaxTokensGrowth | None) -> Callable[[str], bool]:
    """Whether a request id has a final record in ``store``."""
    def final(request_id: str) -> bool:
        record = store.get(request_id)
        return record is not None and (growth is None or growth.is_final(record))
    return final


def run_jobs(jobs: Sequence[Job], store: JsonlStore, to_record: ToRecord, settings: RunSettings,
             *, desc: str = "requests", growth: MaxTokensGrowth | None = None) -> RunSummary:
    """Run every job without a final record in ``store``; returns what happened. Live or Batch API per settings.

    With ``growth``, a provisional record is sent again (from twice the tokens it was cut at) and
    its new record supersedes it (the store must be opened with ``superseding=True``); with the
    Batch API, rounds follow one another until every record is final or a round makes no progress.
    """
    ids = [j.request_id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids are not unique")
    final = stored_and_final(store, growth)
    if growth is not None and not store.superseding:
        raise ValueError(f"{store.path}: provisional records need a store opened with superseding=True")
    summary = RunSummary(total=len(jobs), already_done=sum(final(rid) for rid in ids))
    meter = settings.meter()  # one for every round: --max_cost bounds what the whole run spends
    errors = ErrorLog(store.path)
    errors.prune(final)  # a run killed before its end leaves entries its records have since made stale
    start = time.monotonic()
    try:
        while True:
            pending = [growth.resumed(j, store.get(j.request_id)) if growth else j for j in jobs
                       if not final(j.request_id)]
            if not pending:
                break
            completed_before = summary.completed
            if settings.batch_api:
                from .batch_api import run_batch
                run_batch(pending, store, to_record, settings, meter, summary, errors, desc=desc)
            else:
                asyncio.run(_run_live(pending, store, to_record, settings, meter, summary, errors, desc, growth))
            progressed = summary.completed > completed_before
            if not (settings.batch_api and growth and progressed and summary.stopped_reason is None
                    and summary.failed == 0):
                break  # live runs double max_tokens inline; a batch round that did nothing would repeat itself
    finally:
        summary.seconds = time.monotonic() - start
        summary.usage = meter.summary()
        summary.provisional = sum(rid in store and not final(rid) for rid in ids)
        summary.completed = sum(map(final, ids)) - summary.already_done  # batch rounds count each record they got
        errors.prune(final)
    return summary


async def _run_live(pending: Sequence[Job], store: JsonlStore, to_record: ToRecord, settings: RunSettings,
                    meter: CostMeter, summary: RunSummary, errors: ErrorLog, desc: str,
                    growth: MaxTokensGrowth | None) -> None:
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
                while True:  # ends: max_tokens doubles up to the cap, where every record is final
                    record = to_record(job, await client.chat(job.request_id, job.body))
                    store.append(record)  # a provisional one too: a stop before the next size loses nothing
                    if growth is None or growth.is_final(record):
                        break
                    job = growth.resumed(job, record)
                summary.completed += 1
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
