"""``responses``: one chat completion per kept instruction, written in MedInstruct-52k format.

The request is the instruction, then the input if there is one (AlpaCare's scheme). About
57% of the gpt-4 / gpt-3.5 answers in AlpaCare's MedInstruct-test end mid-sentence because
``finish_reason == "length"`` was never checked. Here a truncated answer is requested again
with twice the ``max_tokens`` of the attempt that was cut off (1024, 2048, 4096, ... up to
``max_tokens_cap``, ``runner.MaxTokensGrowth``). Every answer is stored with ``truncated`` and the
``max_tokens`` it was asked with; a truncated one is final only at the cap (then left out of the
exported dataset, never silently kept); below the cap it is provisional, and any rerun asks it
again (after a budget stop, a Batch API round, or with a raised ``--max_tokens_cap``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .client import Completion
from .errors import DataError
from .prompts import NO_INPUT, response_messages
from .runner import Job, MaxTokensGrowth, RunSettings, RunSummary, run_jobs
from .store import JsonlStore, read_records, write_json_atomic

log = logging.getLogger(__name__)
METADATA = ("type", "topic", "view", "difficulty")


@dataclass(frozen=True)
class ResponseConfig:
    model: str = "gpt-3.5-turbo"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    max_tokens_cap: int = 4096


def load_tasks(path: str | Path) -> list[dict]:
    """Read tasks (JSON list or JSONL); instruction must be a non-empty string, input a string if present."""
    tasks = read_records(path)
    for i, t in enumerate(tasks):
        if not isinstance(t.get("instruction"), str) or not t["instruction"].strip():
            raise DataError(path, i, "instruction", "missing, empty or not a string")
        if "input" in t and t["input"] is not None and not isinstance(t["input"], str):
            raise DataError(path, i, "input", f"expected a string, got {type(t['input']).__name__}")
    return tasks


def request_id(task: dict, seen: dict[str, int]) -> str:
    """A stable id from the task's text (so reordering the input file does not mix answers up)."""
    h = hashlib.sha256(f"{task['instruction']}\x00{task.get('input') or ''}".encode()).hexdigest()[:16]
    n = seen.get(h, 0)
    seen[h] = n + 1
    return f"resp-{h}" + (f"-{n}" if n else "")


def make_jobs(tasks: list[dict], cfg: ResponseConfig) -> list[Job]:
    seen: dict[str, int] = {}
    jobs = []
    for t in tasks:
        body = {"model": cfg.model, "messages": response_messages(t["instruction"], t.get("input")),
                "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
        jobs.append(Job(request_id=request_id(t, seen), body=body, meta={"task": t}))
    return jobs


def to_record(job: Job, completion: Completion) -> dict:
    t = job.meta["task"]
    return {"request_id": job.request_id, "instruction": t["instruction"], "input": t.get("input") or NO_INPUT,
            "output": completion.content, **{k: t[k] for k in METADATA if k in t},
            "finish_reason": completion.finish_reason, "truncated": completion.finish_reason == "length",
            "max_tokens": int(job.body["max_tokens"]), "model": completion.model, "usage": completion.usage(),
            "attempts": completion.attempts}


def generate(tasks_file: str | Path, out: str | Path, cfg: ResponseConfig, settings: RunSettings,
             export: str | Path | None = None) -> tuple[RunSummary, dict]:
    tasks = load_tasks(tasks_file)
    jobs = make_jobs(tasks, cfg)
    growth = MaxTokensGrowth(cfg.max_tokens_cap)
    with JsonlStore(out, superseding=True) as store:
        summary = run_jobs(jobs, store, to_record, settings, desc="responses", growth=growth)
        counts = export_dataset(jobs, store, export, growth) if export else {}
    return summary, counts


def export_dataset(jobs: list[Job], store: JsonlStore, path: str | Path, growth: MaxTokensGrowth) -> dict:
    """Write the MedInstruct-52k-format JSON list, in input order; truncated answers left out.

    Counts say what is left out and why: ``truncated_left_out`` (cut off at the cap: final),
    ``truncated_below_cap`` (provisional: a rerun asks them again) and ``missing`` (no answer yet).
    """
    data, missing, below_cap = [], 0, 0
    truncated_at: Counter[str] = Counter()  # max_tokens the answers truncated at the cap were cut at
    for j in jobs:
        rec = store.get(j.request_id)
        if rec is None:
            missing += 1
        elif not growth.is_final(rec):
            below_cap += 1
        elif rec["truncated"]:
            truncated_at[str(rec.get("max_tokens", "unknown"))] += 1
        else:
            data.append({"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"],
                         **{k: rec[k] for k in METADATA if k in rec}})
    write_json_atomic(path, data)
    truncated = sum(truncated_at.values())
    if truncated:  # says the max_tokens each was really cut at, so the message is true whatever the cap
        at = ", ".join(f"{n} at {mt}" for mt, n in sorted(truncated_at.items()))
        log.warning("%d answers were still truncated (max_tokens: %s); left out of %s", truncated, at, path)
    return {"exported": len(data), "truncated_left_out": truncated, "truncated_below_cap": below_cap,
            "missing": missing}
