"""The study's statistics against independent computations: sklearn, statsmodels, scipy."""

from __future__ import annotations

import csv
import io
import json
import random
import sqlite3
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from alpacare_jax.eval.human import stats
from alpacare_jax.eval.human.chart import preference_chart
from alpacare_jax.eval.human.cli import main
from alpacare_jax.eval.human.results import study_results
from alpacare_jax.eval.human.study import create_study
from tests.eval.human.study_fixtures import STYLES, artifacts_dir, write_outputs


def test_kappas_and_agreement_equal_sklearn_and_statsmodels():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=200)
    raters = np.stack([np.where(rng.random(200) < 0.7, truth, rng.integers(0, 3, size=200)) for _ in range(4)], 1)
    for a, b in combinations(range(4), 2):
        assert stats.cohen_kappa(raters[:, a], raters[:, b]) == pytest.approx(
            cohen_kappa_score(raters[:, a], raters[:, b]), abs=1e-12)
        assert stats.percent_agreement(raters[:, a], raters[:, b]) == np.mean(raters[:, a] == raters[:, b])
    counts, _ = aggregate_raters(raters, n_cat=3)
    assert stats.fleiss_kappa(stats.category_counts(raters)) == pytest.approx(fleiss_kappa(counts), abs=1e-12)
    assert np.isnan(stats.cohen_kappa([1, 1, 1], [1, 1, 1]))  # undefined: all ratings in one category


def test_bootstrap_interval_matches_scipy():
    rng = np.random.default_rng(1)
    scores = [list(rng.choice([0.0, 0.5, 1.0], p=[0.3, 0.2, 0.5], size=rng.integers(1, 4))) for _ in range(150)]
    low, high = stats.bootstrap_ci(scores, n_resamples=20000, seed=0)
    sums, counts = np.array([sum(s) for s in scores]), np.array([len(s) for s in scores], dtype=float)
    ref = bootstrap((sums, counts), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True, vectorized=True,
                    method="percentile", n_resamples=20000, confidence_level=0.95, rng=np.random.default_rng(5))
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=0.01)
    assert low < stats.preference(scores) < high


def _vote_at_random(db_path: Path, seed: int) -> list[tuple]:
    """Every rater votes on every assignment, following a shared hidden truth 70% of the time."""
    rng = random.Random(seed)
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT id, item_id FROM assignments").fetchall()
        truth = {item: (rng.choice("AtB"), rng.choice("AtB")) for _, item in rows}
        pick = {"A": "A", "t": "tie", "B": "B"}
        votes = [(aid, *[pick[t if rng.random() < 0.7 else rng.choice("AtB")] for t in truth[item]], f"note {aid}")
                 for aid, item in rows]
        conn.executemany("INSERT INTO votes (assignment_id, correctness, helpfulness, comment) VALUES (?, ?, ?, ?)",
                         votes)
    return votes


def test_study_results_equal_an_independent_computation(tmp_path):
    files = [write_outputs(tmp_path / f"{m}.json", m, 60, style=s)
             for m, s in zip(("alpacare-test", "baseline-test"), STYLES)]
    db_path = tmp_path / "study.sqlite"
    create_study(files, db_path, sample=60, seed=2, raters=4, overlap=3)
    _vote_at_random(db_path, seed=0)
    results = study_results(db_path)

    # Unblind from the raw tables, independently of results.py: label 0 = alpacare-test better.
    with sqlite3.connect(db_path) as conn:
        raw = conn.execute("""SELECT a.rater_id, a.item_id, a.model_1_is_a, v.correctness, v.helpfulness
                              FROM votes v JOIN assignments a ON a.id = v.assignment_id""").fetchall()
    for k, criterion in enumerate(("correctness", "helpfulness")):
        labels = {}
        for rater, item, first_is_a, *choices in raw:
            shown = {"A": 0, "tie": 1, "B": 2}[choices[k]]
            labels[(f"rater-{rater + 1}", item)] = shown if first_is_a else 2 - shown
        tally = Counter(labels.values())
        (comp,) = [c for c in results.comparisons if c.criterion == criterion]
        assert (comp.model_1, comp.model_2) == ("alpacare-test", "baseline-test")
        assert (comp.wins, comp.ties, comp.losses) == (tally[0], tally[1], tally[2])
        assert comp.preference == pytest.approx((tally[0] + tally[1] / 2) / len(labels))
        assert comp.ci_low < comp.preference < comp.ci_high

        (agreement,) = [a for a in results.agreement if a.criterion == criterion]
        by_item = defaultdict(dict)
        for (rater, item), label in labels.items():
            by_item[item][rater] = label
        table = np.array([list(r.values()) for r in by_item.values()])  # every item has 3 votes
        assert agreement.fleiss_kappa == pytest.approx(fleiss_kappa(aggregate_raters(table, n_cat=3)[0]), abs=1e-12)
        assert agreement.fleiss_items == agreement.items == 60
        pairs_agree = [np.mean([a == b for a, b in combinations(row, 2)]) for row in table]
        assert agreement.percent_agreement == pytest.approx(np.mean(pairs_agree))
        assert len(agreement.pairs) == 6
        for pair in agreement.pairs:
            shared = [(r[pair.rater_1], r[pair.rater_2]) for r in by_item.values()
                      if pair.rater_1 in r and pair.rater_2 in r]
            x, y = zip(*shared)
            assert pair.items == len(shared)
            assert pair.cohen_kappa == pytest.approx(cohen_kappa_score(x, y), abs=1e-12)
            assert pair.percent_agreement == pytest.approx(np.mean(np.array(x) == np.array(y)))
    assert [(p.rater, p.done, p.total) for p in results.progress] == [(f"rater-{r}", 45, 45) for r in range(1, 5)]


def test_results_command_writes_json_csv_and_the_chart(tmp_path, capsys):
    files = [write_outputs(tmp_path / f"{m}.json", m, 40, style=s)
             for m, s in zip(("alpacare-test", "baseline-a", "baseline-b"), STYLES)]
    db_path = tmp_path / "study.sqlite"
    create_study(files, db_path, sample=40, seed=0, raters=2)
    votes = _vote_at_random(db_path, seed=1)
    out = tmp_path / "results"
    assert main(["results", "--db", str(db_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "alpacare-test vs baseline-a" in printed and "Fleiss' kappa" in printed
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["comparisons"]) == 6 and len(summary["votes"]) == len(votes) == 240
    rows = list(csv.DictReader(io.StringIO((out / "votes.csv").read_text())))
    assert len(rows) == 240 and {r["comment"] for r in rows} == {v[3] for v in votes}
    png = (out / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert png == preference_chart(study_results(db_path).comparisons)  # the admin page serves the same chart
    (artifacts_dir() / "human_eval_chart.png").write_bytes(png)
