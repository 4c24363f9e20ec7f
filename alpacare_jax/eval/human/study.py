"""Create a study: pair the models' answers by task, sample items, assign them to raters, issue invite tokens.

Answers of different files are paired by their task's content (instruction + input, normalised as the judge
pairs them), not by position or id: AlpaCare's released outputs and `generate` outputs list the same test set
in different orders and schemas. Tasks that some file does not answer are left out, and the command says how
many.

Each sampled task gives one item per pair of models. Each item goes to ``overlap`` raters, chosen so every rater
gets the same workload (within one item) and every pair of raters shares items (agreement needs shared
items). Every rater sees their items in their own random order, and in half of them (exactly, per
rater) the first model's answer is shown as B, so the A/B order is balanced over the study and differs
between raters at random.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_gen import DataError, Example, load_outputs, read_records, text_key

from . import db

log = logging.getLogger(__name__)


class StudyError(ValueError):
    """A study that cannot be made as asked (the message says why, in one line)."""


@dataclass(frozen=True)
class ModelOutputs:
    """One model's answers, keyed by task content (the n-th repeat of a task text is its own key)."""
    name: str
    source: Path
    answers: dict[tuple[str, int], Example]


@dataclass(frozen=True)
class Invites:
    """What `create` hands out: one secret link per rater, and the admin's."""
    admin_token: str
    rater_tokens: dict[str, str]  # rater name -> token

    def links(self, base_url: str) -> list[tuple[str, str]]:
        base = base_url.rstrip("/")
        return [(name, f"{base}/login/{token}") for name, token in self.rater_tokens.items()] + [
            ("admin", f"{base}/login/{self.admin_token}")]


def model_name(path: Path) -> str:
    """The `generator` the file names (what `generate` writes), else its directory (AlpaCare's release layout)."""
    names: dict[str, int] = {}
    for i, record in enumerate(read_records(path)):
        gen = record.get("generator")
        if gen is not None and not isinstance(gen, str):
            raise DataError(path, i, "generator", f"expected a string, got {type(gen).__name__}")
        if gen:
            names.setdefault(gen, i)
    if len(names) > 1:
        (first, _), (other, i) = list(names.items())[:2]
        raise DataError(path, i, "generator", f"{other!r} differs from {first!r}: one model per file")
    return next(iter(names), None) or path.resolve().parent.name


def load_model_outputs(path: str | Path) -> ModelOutputs:
    path = Path(path)
    answers: dict[tuple[str, int], Example] = {}
    seen: Counter[str] = Counter()
    for ex in load_outputs(path):
        key = text_key(ex.instruction, ex.input)
        if not key:
            raise DataError(path, ex.index, "instruction", "empty instruction and input")
        answers[(key, seen[key])] = ex
        seen[key] += 1
    return ModelOutputs(name=model_name(path), source=path, answers=answers)


def assign(n_items: int, raters: int, overlap: int) -> list[list[int]]:
    """Item indices per rater: each item goes to the `overlap` raters with the fewest items so far.

    Among equally loaded raters, the one sharing the fewest items with those already chosen for the item
    wins, so workloads differ by at most one item and the shared items spread over all pairs of raters.
    """
    queues: list[list[int]] = [[] for _ in range(raters)]
    shared = [[0] * raters for _ in range(raters)]
    for k in range(n_items):
        chosen: list[int] = []
        for _ in range(overlap):
            chosen.append(min((r for r in range(raters) if r not in chosen),
                              key=lambda r: (len(queues[r]), sum(shared[r][c] for c in chosen), r)))
        for r in chosen:
            queues[r].append(k)
            for c in chosen:
                shared[r][c] += r != c
    return queues


def create_study(outputs: Sequence[str | Path], db_path: str | Path, *, sample: int | None = None, seed: int = 0,
                 raters: int = 3, overlap: int | None = None) -> Invites:
    """Write a new study database from two or more output files and return its invite tokens.

    ``sample``: how many tasks (all tasks answered by every file if None); each gives one item per model pair.
    ``overlap``: how many raters rate each item (default: all of them).
    """
    db_path = Path(db_path)
    if len(outputs) < 2:
        raise StudyError("a study compares two or more output files")
    if raters < 1:
        raise StudyError(f"--raters must be at least 1, got {raters}")
    overlap = raters if overlap is None else overlap
    if not 1 <= overlap <= raters:
        raise StudyError(f"--overlap must be between 1 and --raters ({raters}), got {overlap}")
    if db_path.exists():
        raise StudyError(f"{db_path} already exists: a study is never overwritten (choose another --db)")

    models = [load_model_outputs(p) for p in outputs]
    names = Counter(m.name for m in models)
    if dup := [n for n, c in names.items() if c > 1]:
        raise StudyError(f"two output files are both named {dup[0]!r} (by their `generator` field or directory)")
    common = [k for k in models[0].answers if all(k in m.answers for m in models[1:])]
    for m in models:
        if left_out := len(m.answers) - len(common):
            log.warning("%s: %d of its %d tasks are not answered by every file and are left out",
                        m.source, left_out, len(m.answers))
    if sample is None:
        sample = len(common)
    if not 1 <= sample <= len(common):
        raise StudyError(f"--sample {sample}: the files answer {len(common)} tasks in common")

    rng = random.Random(seed)
    tasks = rng.sample(common, sample)
    pairs = list(itertools.combinations(range(len(models)), 2))
    items = [(t, pair) for t in range(len(tasks)) for pair in pairs]
    invites = Invites(admin_token=secrets.token_urlsafe(24),
                      rater_tokens={f"rater-{r + 1}": secrets.token_urlsafe(24) for r in range(raters)})

    conn = db.connect(db_path)
    try:
        with db.transaction(conn):
            for statement in db.SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("admin_token", invites.admin_token), ("csrf_secret", secrets.token_hex(32)), ("seed", str(seed)),
                ("overlap", str(overlap))])
            conn.executemany("INSERT INTO models (id, name, source) VALUES (?, ?, ?)",
                             [(i, m.name, str(m.source)) for i, m in enumerate(models)])
            for t, key in enumerate(tasks):
                ex = models[0].answers[key]
                conn.execute("INSERT INTO tasks (id, instruction, input) VALUES (?, ?, ?)",
                             (t, ex.instruction, ex.input))
                conn.executemany("INSERT INTO answers VALUES (?, ?, ?)",
                                 [(t, i, m.answers[key].output) for i, m in enumerate(models)])
            conn.executemany("INSERT INTO items (id, task_id, model_1, model_2) VALUES (?, ?, ?, ?)",
                             [(k, t, a, b) for k, (t, (a, b)) in enumerate(items)])
            for r, (name, token) in enumerate(invites.rater_tokens.items()):
                conn.execute("INSERT INTO raters (id, name, token) VALUES (?, ?, ?)", (r, name, token))
            for r, queue in enumerate(assign(len(items), raters, overlap)):
                rng.shuffle(queue)
                half = len(queue) // 2
                first_as_a = [True] * half + [False] * half + [rng.random() < 0.5] * (len(queue) % 2)
                rng.shuffle(first_as_a)
                conn.executemany(
                    "INSERT INTO assignments (rater_id, item_id, position, model_1_is_a) VALUES (?, ?, ?, ?)",
                    [(r, k, pos + 1, int(a)) for pos, (k, a) in enumerate(zip(queue, first_as_a))])
    except BaseException:
        conn.close()
        for leftover in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
            leftover.unlink(missing_ok=True)  # a half-made study is no study
        raise
    conn.close()
    log.info("study %s: %d models, %d tasks, %d items, %d raters x %d items each",
             db_path, len(models), len(tasks), len(items), raters, len(items) * overlap // raters)
    return invites
