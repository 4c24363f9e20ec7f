"""``--batch_api``: run jobs through the OpenAI Batch API (files + batches) at half the price.

Resumable by stored batch ids: every batch created is written at once to
``<store>.batches.json`` with the request ids it covers. A rerun polls the batches it knows
instead of submitting their requests again, collects finished output files into the same
append-only store the live mode uses, and submits only requests that no batch covers.
Batches that end without a result for some request (failed, expired) leave those ids out of
the store, so the next run submits them again.

The one window left: a crash between ``batches.create`` returning and the state file being
written (milliseconds) would leave a batch the next run does not know about.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import openai
from tqdm import tqdm

from .accounting import CostMeter, estimate_tokens
from .client import MalformedCompletion, completion_from_dict
from .errors import BudgetExceeded
from .runner import ErrorLog, Job, RunSettings, RunSummary, ToRecord
from .store import JsonlStore, write_json_atomic

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
MAX_REQUESTS_PER_BATCH = 50_000  # the API's limit per batch file


def state_path(store: JsonlStore) -> Path:
    return store.path.with_name(store.path.name + ".batches.json")


def _load_state(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"batches": []}


def _worst_case(meter: CostMeter, job: Job) -> float:
    prompt = sum(estimate_tokens(str(m.get("content", ""))) for m in job.body.get("messages", []))
    return meter.worst_case(job.body["model"], prompt, int(job.body.get("max_tokens") or 1024))


def run_batch(pending: Sequence[Job], store: JsonlStore, to_record: ToRecord, settings: RunSettings,
              meter: CostMeter, summary: RunSummary, errors: ErrorLog, *, desc: str = "batch") -> None:
    """Submit the pending jobs no stored batch covers, then collect every open batch into ``store``.

    One call is one round: a result that needs another (a reply cut off below the max_tokens cap)
    is stored as provisional, and the runner's next round sends it again. The budget reserved for a
    batch submitted here is released when its results are in, which then count at their real cost.
    """
    cfg = settings.client
    client = openai.OpenAI(api_key=cfg.resolved_key(), base_url=cfg.resolved_base_url(),
                           timeout=cfg.timeout, max_retries=cfg.max_attempts)
    spath = state_path(store)
    state = _load_state(spath)
    jobs = {j.request_id: j for j in pending}
    covered = {rid for b in state["batches"] if not b["collected"] for rid in b["request_ids"]}
    new = [j for j in pending if j.request_id not in covered]
    reserved: dict[str, float] = {}  # batch id -> worst-case cost reserved for it by this call

    for start in range(0, len(new), MAX_REQUESTS_PER_BATCH):
        chunk = new[start:start + MAX_REQUESTS_PER_BATCH]
        worst = sum(_worst_case(meter, j) for j in chunk)
        try:
            meter.reserve(worst)
        except BudgetExceeded as e:
            summary.stopped_reason = str(e)
            break
        payload = "".join(json.dumps({"custom_id": j.request_id, "method": "POST", "url": ENDPOINT,
                                      "body": j.body}, ensure_ascii=False) + "\n" for j in chunk)
        upload = client.files.create(file=(f"{store.path.stem}-{len(state['batches'])}.jsonl",
                                           io.BytesIO(payload.encode("utf-8"))), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h",
                                      metadata={"data_gen_store": store.path.name})
        reserved[batch.id] = worst
        state["batches"].append({"id": batch.id, "input_file_id": upload.id, "collected": False,
                                 "request_ids": [j.request_id for j in chunk]})
        write_json_atomic(spath, state)
        log.info("submitted batch %s with %d requests", batch.id, len(chunk))

    open_batches = [b for b in state["batches"] if not b["collected"]]
    bar = tqdm(total=sum(len(b["request_ids"]) for b in open_batches), desc=desc, unit="req",
               disable=not settings.progress, dynamic_ncols=True)
    try:
        for entry in open_batches:
            batch = client.batches.retrieve(entry["id"])
            while batch.status not in TERMINAL:
                bar.set_postfix(batch=entry["id"][-8:], status=batch.status, refresh=True)
                time.sleep(settings.batch_poll_seconds)
                batch = client.batches.retrieve(entry["id"])
            if batch.output_file_id:
                text = client.files.content(batch.output_file_id).text
                _collect(text, jobs, store, to_record, meter, summary, errors)
            if getattr(batch, "error_file_id", None):
                for line in client.files.content(batch.error_file_id).text.splitlines():
                    if line.strip():
                        obj = json.loads(line)
                        summary.failed += 1
                        errors.write(obj.get("custom_id", "?"), json.dumps(obj.get("error") or obj.get("response")))
            if batch.status != "completed":
                log.warning("batch %s ended as %s; its missing requests will be resubmitted by the next run",
                            entry["id"], batch.status)
            meter.release(reserved.pop(entry["id"], 0.0))
            entry["collected"] = True
            write_json_atomic(spath, state)
            bar.update(len(entry["request_ids"]))
    finally:
        bar.close()


def _collect(text: str, jobs: dict[str, Job], store: JsonlStore, to_record: ToRecord, meter: CostMeter,
             summary: RunSummary, errors: ErrorLog) -> None:
    for line in text.splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        rid = obj.get("custom_id")
        job = jobs.get(rid)
        if job is None:
            if rid not in store:  # else collected by a run killed before it marked the batch collected
                log.warning("batch result %r matches no job of this run; ignored", rid)
            continue
        resp = obj.get("response") or {}
        if resp.get("status_code") != 200:
            summary.failed += 1
            errors.write(rid, json.dumps(obj.get("error") or resp))
            continue
        try:
            completion = completion_from_dict(resp["body"])
        except MalformedCompletion as e:
            summary.failed += 1
            errors.write(rid, str(e))
            continue
        cost = meter.add_usage(completion.model or job.body["model"], completion.prompt_tokens,
                               completion.completion_tokens)
        completion = type(completion)(**{**completion.__dict__, "cost": cost})
        store.append(to_record(job, completion))
        summary.completed += 1
