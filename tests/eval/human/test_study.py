"""Making a study: pairing by content, sampling, rater assignment, A/B balance, bad input, no JAX."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from itertools import combinations

import pytest

from alpacare_jax.eval.human.cli import main
from alpacare_jax.eval.human.study import StudyError, assign, create_study
from data_gen.errors import DataError
from tests.eval.human.study_fixtures import (
    REPO_ROOT,
    STYLES,
    subprocess_env,
    write_outputs,
)


def test_study_modules_do_not_import_jax():
    code = ("import sys; import alpacare_jax.eval.human.cli, alpacare_jax.eval.human.app, "
            "alpacare_jax.eval.human.results, alpacare_jax.eval.human.chart; "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))")
    subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO_ROOT, check=True)


def test_assignment_rotates_evenly_and_every_rater_pair_shares_items():
    queues = assign(30, raters=4, overlap=2)
    assert [len(q) for q in queues] == [15] * 4
    per_item = Counter(k for q in queues for k in q)
    assert set(per_item.values()) == {2}
    for a, b in combinations(range(4), 2):
        assert set(queues[a]) & set(queues[b]), (a, b)


def test_released_outputs_pair_by_content(alpacare_data, tmp_path):
    """gpt-4 (`output`) and claude-2 (`response`, and a Human/Assistant `prompt` on iCliniq), in different orders."""
    refs = alpacare_data / "reference_outputs"
    gpt4 = [json.loads(line) for line in (refs / "gpt-4" / "iCliniq_output.jsonl").open()]
    shuffled = tmp_path / "gpt-4" / "iCliniq_output.json"
    shuffled.parent.mkdir()
    shuffled.write_text(json.dumps(gpt4[::-1]))  # another order: pairing must not rely on positions
    db_path = tmp_path / "study.sqlite"
    create_study([shuffled, refs / "claude-2" / "iCliniq_output.jsonl"], db_path, sample=25, seed=1, raters=3,
                 overlap=2)
    claude = {json.loads(line)["response"] for line in (refs / "claude-2" / "iCliniq_output.jsonl").open()}
    by_input = {r["input"]: r["output"] for r in gpt4}
    with sqlite3.connect(db_path) as conn:
        assert [n for (n,) in conn.execute("SELECT name FROM models ORDER BY id")] == ["gpt-4", "claude-2"]
        rows = conn.execute("""SELECT t.input, x0.output, x1.output FROM tasks t
                               JOIN answers x0 ON x0.task_id = t.id AND x0.model_id = 0
                               JOIN answers x1 ON x1.task_id = t.id AND x1.model_id = 1""").fetchall()
        per_rater = [n for (n,) in conn.execute("SELECT COUNT(*) FROM assignments GROUP BY rater_id")]
    assert len(rows) == 25 and len({r[0] for r in rows}) == 25
    for inp, out_gpt4, out_claude in rows:
        assert by_input[inp] == out_gpt4
        assert out_claude in claude
    assert sorted(per_rater) == [16, 17, 17]  # 25 items x 2 raters over 3


def test_ab_order_is_balanced_and_differs_between_raters(tmp_path):
    files = [write_outputs(tmp_path / f"{m}.json", m, 101, style=s)
             for m, s in zip(("model-x", "model-y", "model-z"), STYLES)]
    db_path = tmp_path / "study.sqlite"
    create_study(files, db_path, sample=101, seed=3, raters=3)
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT rater_id, item_id, model_1_is_a, position FROM assignments").fetchall()
    assert len(rows) == 3 * 303  # 101 tasks x 3 model pairs, every rater rates every item
    shown_first = sum(r[2] for r in rows) / len(rows)
    assert abs(shown_first - 0.5) <= 0.05, shown_first  # balanced within 10%
    for rater in range(3):
        mine = [r[2] for r in rows if r[0] == rater]
        assert abs(sum(mine) - len(mine) / 2) <= 1
    sides = defaultdict(set)
    for _, item, first_is_a, _ in rows:
        sides[item].add(first_is_a)
    assert sum(len(s) == 2 for s in sides.values()) > 100  # the order differs between raters on many items
    orders = [[r[1] for r in sorted((r for r in rows if r[0] == rater), key=lambda r: r[3])] for rater in range(3)]
    assert orders[0] != orders[1] != orders[2]  # each rater has their own item order


def test_cli_create_prints_one_link_per_rater_and_the_admin(tmp_path):
    files = [write_outputs(tmp_path / f"{m}.json", m, 12, style=s)
             for m, s in zip(("alpacare-test", "baseline-test"), STYLES)]
    db_path = tmp_path / "study.sqlite"
    run = subprocess.run([sys.executable, "-m", "alpacare_jax.eval.human", "create", "--outputs", *map(str, files),
                          "--sample", "10", "--seed", "0", "--raters", "3", "--overlap", "2", "--db", str(db_path),
                          "--base_url", "https://study.example.org"],
                         env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    links = [line.split(": ", 1) for line in run.stdout.splitlines() if "/login/" in line]
    assert [name.strip() for name, _ in links] == ["rater-1", "rater-2", "rater-3", "admin"]
    tokens = [link.rsplit("/", 1)[1] for _, link in links]
    assert all(link.startswith("https://study.example.org/login/") for _, link in links)
    assert len(set(tokens)) == 4 and min(map(len, tokens)) >= 32  # unguessable: 24 random bytes each
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM assignments").fetchone()[0] == 20


def _cli_error(tmp_path, capsys, *args) -> str:
    assert main(["create", *args, "--db", str(tmp_path / "bad.sqlite")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert not (tmp_path / "bad.sqlite").exists()
    return errors[0]


def test_bad_input_is_one_line_naming_file_record_and_field(tmp_path, capsys):
    good = write_outputs(tmp_path / "good.json", "good-model", 5, style=STYLES[0])
    records = json.loads(good.read_text())
    records[3]["output"] = 7
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**r, "generator": "bad-model"} for r in records]))
    error = _cli_error(tmp_path, capsys, "--outputs", str(good), str(bad))
    assert str(bad) in error and "record 3" in error and "'output'" in error

    records = json.loads(good.read_text())
    records[2]["generator"] = "another-model"
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(records))
    error = _cli_error(tmp_path, capsys, "--outputs", str(good), str(mixed))
    assert str(mixed) in error and "record 2" in error and "'generator'" in error

    error = _cli_error(tmp_path, capsys, "--outputs", str(good), str(good))
    assert "good-model" in error
    other = write_outputs(tmp_path / "o.json", "other", 5, style=STYLES[1])
    error = _cli_error(tmp_path, capsys, "--outputs", str(good), str(other), "--sample", "6")
    assert "5 tasks in common" in error


def test_existing_study_is_never_overwritten(tmp_path):
    files = [write_outputs(tmp_path / f"{m}.json", m, 4, style=s) for m, s in zip(("m1", "m2"), STYLES)]
    db_path = tmp_path / "study.sqlite"
    create_study(files, db_path, raters=1)
    before = db_path.read_bytes()
    with pytest.raises(StudyError, match="already exists"):
        create_study(files, db_path, raters=1)
    assert db_path.read_bytes() == before
    with pytest.raises(DataError, match="file not found"):
        create_study([files[0], tmp_path / "missing.json"], tmp_path / "other.sqlite")
