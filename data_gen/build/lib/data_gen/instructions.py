"""``instructions``: generate new medical tasks from clinician-written seed tasks (AlpaCare's scheme).

Each request shows 3 seed tasks sampled from the seed file and asks for N new ones. Request
``i`` always samples the same seeds (the RNG is seeded by ``(seed, i)``), so a rerun after a
crash sends exactly the requests that are missing and nothing else. The store holds one
record per request: the parsed tasks plus counts of what was rejected and why.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .client import Completion
from .errors import DataError
from .parse import parse_tasks
from .prompts import generation_messages
from .runner import Job, RunSettings, RunSummary, run_jobs
from .store import JsonlStore, read_records

SEED_FIELDS = ("topic", "view", "type", "instruction", "input", "difficulty")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling parameters; the defaults are AlpaCare's."""

    model: str = "gpt-4"
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 1.5
    frequency_penalty: float = 0.0
    max_tokens: int = 3072
    tasks_per_request: int = 20
    seeds_per_request: int = 3
    seed: int = 0


def load_seed_tasks(path: str | Path) -> list[dict]:
    """Read seed tasks (med_seed.json format); every field must be a string, instruction non-empty."""
    tasks = read_records(path)
    for i, t in enumerate(tasks):
        for f in SEED_FIELDS:
            if f not in t:
                raise DataError(path, i, f, "missing")
            if not isinstance(t[f], (str, int)):
                raise DataError(path, i, f, f"expected a string, got {type(t[f]).__name__}")
        if not str(t["instruction"]).strip():
            raise DataError(path, i, "instruction", "empty")
    if not tasks:
        raise DataError(path, None, None, "no seed tasks")
    return tasks


def make_jobs(seeds: list[dict], num_requests: int, cfg: GenerationConfig) -> list[Job]:
    k = min(cfg.seeds_per_request, len(seeds))
    jobs = []
    for i in range(num_requests):
        rng = random.Random(f"{cfg.seed}:{i}")
        picked = rng.sample(range(len(seeds)), k)
        body = {"model": cfg.model, "messages": generation_messages([seeds[j] for j in picked], cfg.tasks_per_request),
                "temperature": cfg.temperature, "top_p": cfg.top_p, "presence_penalty": cfg.presence_penalty,
                "frequency_penalty": cfg.frequency_penalty, "max_tokens": cfg.max_tokens}
        jobs.append(Job(request_id=f"gen-s{cfg.seed}-{i:07d}", body=body, meta={"seed_indices": picked}))
    return jobs


def to_record(job: Job, completion: Completion) -> dict:
    """Parse the completion; truncated last tasks and broken ones are counted, not kept."""
    parsed = parse_tasks(completion.content, completion.finish_reason)
    return {"request_id": job.request_id, "seed_indices": job.meta["seed_indices"],
            "tasks": [t.to_dict() for t in parsed.tasks], "rejected": dict(parsed.rejected),
            "notes": dict(parsed.notes), "finish_reason": completion.finish_reason,
            "model": completion.model, "usage": completion.usage(), "raw": completion.content}


def generate(seed_file: str | Path, out: str | Path, num_requests: int, cfg: GenerationConfig,
             settings: RunSettings) -> tuple[RunSummary, dict]:
    """Run (or resume) generation; returns the run summary and task/rejection totals of the store."""
    seeds = load_seed_tasks(seed_file)
    jobs = make_jobs(seeds, num_requests, cfg)
    with JsonlStore(out) as store:
        summary = run_jobs(jobs, store, to_record, settings, desc="instructions")
        totals = store_totals(store.records.values())
    return summary, totals


def store_totals(records) -> dict:
    totals: dict[str, int] = {"requests": 0, "tasks": 0}
    for r in records:
        totals["requests"] += 1
        totals["tasks"] += len(r.get("tasks", []))
        for k, v in r.get("rejected", {}).items():
            totals[f"rejected_{k}"] = totals.get(f"rejected_{k}", 0) + v
    return totals


def flatten_tasks(path: str | Path) -> list[dict]:
    """Tasks of a raw generation store, in a stable order (request id, then position).

    Completion order varies from run to run; sorting by request id makes keep-first
    deduplication give the same result however the requests happened to finish.
    """
    records = read_records(path)
    out = []
    for i, r in enumerate(records):
        if "tasks" not in r:  # already a flat list of tasks
            if "instruction" not in r:
                raise DataError(path, i, "instruction", "missing (expected tasks or a generation store)")
            out.append(r)
    if out:
        return out
    for r in sorted(records, key=lambda r: r["request_id"]):
        for j, t in enumerate(r["tasks"]):
            out.append({**t, "source": f"{r['request_id']}#{j}"})
    return out
