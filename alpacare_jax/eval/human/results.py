"""Study results: votes in model terms, win / tie / loss with bootstrap intervals, agreement, progress, exports.

This is the only place votes are unblinded: a vote says "A better" as the rater saw it, and the assignment
says whether the pair's first model was A. Everything here is for the admin page and the `results` command.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from . import db, stats

OUTCOMES = ("model_1", "tie", "model_2")  # label 0, 1, 2: which model of the item's pair was better
SCORE = {0: 1.0, 1: 0.5, 2: 0.0}  # the first model's score: a win counts 1, a tie half


@dataclass(frozen=True)
class Vote:
    rater: str
    item: int
    instruction: str
    input: str
    model_1: str
    model_2: str
    model_1_shown_as: str  # "A" or "B"
    correctness: str  # one of OUTCOMES
    helpfulness: str
    comment: str
    updated_at: str
    revisions: int


@dataclass(frozen=True)
class Comparison:
    """One model pair on one criterion, from the first model's side."""
    model_1: str
    model_2: str
    criterion: str
    wins: int
    ties: int
    losses: int
    items: int
    preference: float  # (wins + ties / 2) / votes
    ci_low: float  # 95% percentile bootstrap over items
    ci_high: float


@dataclass(frozen=True)
class RaterPair:
    rater_1: str
    rater_2: str
    items: int
    percent_agreement: float
    cohen_kappa: float


@dataclass(frozen=True)
class Agreement:
    criterion: str
    items: int  # items with two or more votes
    percent_agreement: float  # agreeing rater pairs per item, averaged over those items
    fleiss_kappa: float  # over the items with a vote from every rater they were assigned to
    fleiss_items: int
    pairs: list[RaterPair]


@dataclass(frozen=True)
class Progress:
    rater: str
    done: int
    total: int


@dataclass(frozen=True)
class StudyResults:
    models: list[str]
    comparisons: list[Comparison]
    agreement: list[Agreement]
    progress: list[Progress]
    votes: list[Vote]

    def summary(self) -> dict:
        """Everything but the individual votes, JSON-ready (undefined kappas become null)."""
        return _finite({"models": self.models, "comparisons": [asdict(c) for c in self.comparisons],
                        "agreement": [asdict(a) for a in self.agreement],
                        "progress": [asdict(p) for p in self.progress]})

    def to_json(self) -> str:
        return json.dumps({**self.summary(), "votes": [asdict(v) for v in self.votes]}, ensure_ascii=False, indent=2)

    def votes_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(Vote.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(v) for v in self.votes)
        return out.getvalue()

    def table(self) -> str:
        """A plain-text report for the terminal."""
        lines = [f"{'model pair':<44} {'criterion':<12} {'win':>5} {'tie':>5} {'loss':>5} {'preference (95% CI)':>24}"]
        for c in self.comparisons:
            pair = f"{c.model_1} vs {c.model_2}"
            lines.append(f"{pair:<44} {c.criterion:<12} {c.wins:>5} {c.ties:>5} {c.losses:>5} "
                         f"{c.preference:>9.1%} ({c.ci_low:.1%}-{c.ci_high:.1%})")
        for a in self.agreement:
            lines.append(f"{a.criterion}: percent agreement {a.percent_agreement:.1%} over {a.items} items, "
                         f"Fleiss' kappa {a.fleiss_kappa:.3f} over {a.fleiss_items} items")
            lines += [f"  {p.rater_1} / {p.rater_2}: {p.items} items, agreement {p.percent_agreement:.1%}, "
                      f"Cohen's kappa {p.cohen_kappa:.3f}" for p in a.pairs]
        lines += [f"{p.rater}: {p.done} / {p.total}" for p in self.progress]
        return "\n".join(lines)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _label(choice: str, model_1_is_a: bool) -> int:
    """A displayed choice as a label in model terms."""
    shown = db.CHOICES.index(choice)  # 0 = A, 1 = tie, 2 = B
    return shown if model_1_is_a else 2 - shown


def load_votes(conn) -> list[Vote]:
    rows = conn.execute("""
        SELECT r.name AS rater, i.id AS item, t.instruction, t.input, m1.name AS model_1, m2.name AS model_2,
               a.model_1_is_a, v.correctness, v.helpfulness, v.comment, v.updated_at, v.revisions
        FROM votes v JOIN assignments a ON a.id = v.assignment_id JOIN raters r ON r.id = a.rater_id
        JOIN items i ON i.id = a.item_id JOIN tasks t ON t.id = i.task_id
        JOIN models m1 ON m1.id = i.model_1 JOIN models m2 ON m2.id = i.model_2
        ORDER BY i.id, r.id""").fetchall()
    return [Vote(rater=r["rater"], item=r["item"], instruction=r["instruction"], input=r["input"],
                 model_1=r["model_1"], model_2=r["model_2"], model_1_shown_as="A" if r["model_1_is_a"] else "B",
                 correctness=OUTCOMES[_label(r["correctness"], r["model_1_is_a"])],
                 helpfulness=OUTCOMES[_label(r["helpfulness"], r["model_1_is_a"])],
                 comment=r["comment"], updated_at=r["updated_at"], revisions=r["revisions"]) for r in rows]


def compare(votes: list[Vote], criterion: str, *, n_resamples: int = 2000, seed: int = 0) -> list[Comparison]:
    by_pair: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for v in votes:
        by_pair[(v.model_1, v.model_2)][v.item].append(OUTCOMES.index(getattr(v, criterion)))
    out = []
    for (m1, m2), items in by_pair.items():
        labels = [x for ls in items.values() for x in ls]
        scores = [[SCORE[x] for x in ls] for ls in items.values()]
        low, high = stats.bootstrap_ci(scores, n_resamples=n_resamples, seed=seed)
        out.append(Comparison(model_1=m1, model_2=m2, criterion=criterion, wins=labels.count(0), ties=labels.count(1),
                              losses=labels.count(2), items=len(items), preference=stats.preference(scores),
                              ci_low=low, ci_high=high))
    return out


def agree(votes: list[Vote], criterion: str, overlap: int) -> Agreement:
    by_item: dict[int, dict[str, int]] = defaultdict(dict)
    for v in votes:
        by_item[v.item][v.rater] = OUTCOMES.index(getattr(v, criterion))
    shared = [list(r.values()) for r in by_item.values() if len(r) >= 2]
    complete = [r for r in shared if len(r) == overlap]
    raters = sorted({v.rater for v in votes}, key=lambda name: (len(name), name))
    pairs = []
    for r1, r2 in itertools.combinations(raters, 2):
        both = [(r[r1], r[r2]) for r in by_item.values() if r1 in r and r2 in r]
        if both:
            a, b = zip(*both)
            pairs.append(RaterPair(r1, r2, len(both), stats.percent_agreement(a, b), stats.cohen_kappa(a, b)))
    nan = float("nan")
    return Agreement(criterion=criterion, items=len(shared),
                     percent_agreement=stats.mean_pair_agreement(stats.category_counts(shared)) if shared else nan,
                     fleiss_kappa=stats.fleiss_kappa(stats.category_counts(complete)) if complete else nan,
                     fleiss_items=len(complete), pairs=pairs)


def study_results(db_path: str | Path, *, n_resamples: int = 2000, seed: int = 0) -> StudyResults:
    """Compute everything the admin page and the `results` command show."""
    with db.opened(db_path) as conn:
        votes = load_votes(conn)
        overlap = int(db.meta(conn, "overlap"))
        models = [r["name"] for r in conn.execute("SELECT name FROM models ORDER BY id")]
        progress = [Progress(r["name"], r["done"], r["total"]) for r in conn.execute("""
            SELECT r.name, COUNT(a.id) AS total, COUNT(v.assignment_id) AS done FROM raters r
            JOIN assignments a ON a.rater_id = r.id LEFT JOIN votes v ON v.assignment_id = a.id
            GROUP BY r.id ORDER BY r.id""")]
    return StudyResults(
        models=models,
        comparisons=[c for crit in db.CRITERIA for c in compare(votes, crit, n_resamples=n_resamples, seed=seed)],
        agreement=[agree(votes, crit, overlap) for crit in db.CRITERIA] if overlap > 1 else [],
        progress=progress, votes=votes)
