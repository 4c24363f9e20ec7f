"""The benchmark suite command end to end: every task of the suite over small local files in each dataset's
own columns, AlpacaFarm judged through a real local OpenAI-compatible server, one table; a rerun recomputes
nothing; a malformed file stops with file, record and field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alpacare_jax.eval import tasks as tasks_lib
from alpacare_jax.eval.benchmarks import SuiteLayout
from tests.data_gen.fake_openai_server import FakeOpenAI
from tests.eval.fixtures import tiny_hf_dir, write_local_data  # noqa: F401 (fixture)
from tests.train.harness import REPO_ROOT, subprocess_env

SECRET = "sk-suite-test-key"


def suite_tasks() -> list[str]:
    return [t for b in tasks_lib.benchmarks() for t in b.tasks] + [tasks_lib.ALPACA_FARM]


def run_suite_command(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alpacare_jax.eval", "benchmarks", "--no_progress", *args],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_suite_table_every_task_judged_alpaca_farm_and_resume(tiny_hf_dir, tmp_path):  # noqa: F811
    data_dir = write_local_data(tmp_path / "data", suite_tasks(), n=2)
    out_dir = tmp_path / "bench"
    args = [f"--model={tiny_hf_dir}", "--name=tiny", "--suite=all", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            "--batch_size=8", "--max_new_tokens=8", "--max_gen_toks=8"]
    with FakeOpenAI(lifetime=600) as judge:
        env = dict(subprocess_env(1), OPENAI_BASE_URL=judge.base_url, OPENAI_API_KEY=SECRET)
        first = run_suite_command(*args, env=env)
        assert first.returncode == 0, first.stderr[-4000:]
        requests = len(judge.ledger)
        layout = SuiteLayout(out_dir)
        stamps = {p: p.stat().st_mtime_ns for p in (out_dir / "tiny" / "results").iterdir()}
        second = run_suite_command(*args, env=env)
        assert second.returncode == 0, second.stderr[-4000:]
        assert len(judge.ledger) == requests == 4  # two AlpacaFarm answers, both orders; then the caches
    assert "tiny: MedQA (1 tasks)" in first.stderr and "AlpacaFarm: 2 " in first.stderr
    assert "tasks)" not in second.stderr and "AlpacaFarm: " not in second.stderr  # nothing was recomputed
    assert {p: p.stat().st_mtime_ns for p in (out_dir / "tiny" / "results").iterdir()} == stamps
    assert SECRET not in first.stdout + first.stderr + "".join(p.read_text() for p in out_dir.rglob("*.json*"))

    table = json.loads((out_dir / "benchmarks.json").read_text())
    titles = [b.title for b in tasks_lib.benchmarks()]
    assert [c["title"] for c in table["columns"]] == titles
    row = table["rows"]["tiny"]
    for benchmark in tasks_lib.benchmarks():
        score = row[benchmark.title]
        assert score is not None and score["complete"], benchmark.title
        assert 0 <= score["score"] <= 100
        expected_n = 2 * max(1, len(benchmark.tasks))
        assert score["n"] == expected_n, benchmark.title
        for task in benchmark.tasks:  # every harness task stored with its own results
            assert json.loads(layout.result("tiny", task).read_text())["n"] == 2
    assert row["AlpacaFarm"]["judge_model"] == "gpt-3.5-turbo"
    markdown = (out_dir / "benchmarks.md").read_text()
    for title in titles + ["Medical avg", "General avg", "| tiny |"]:
        assert title in markdown
    assert markdown in first.stdout


def test_malformed_local_file_names_file_record_and_field(tiny_hf_dir, tmp_path):  # noqa: F811
    data_dir = write_local_data(tmp_path / "data", ["pubmedqa"], n=3)
    path = data_dir / "pubmedqa" / "test.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    del records[1]["final_decision"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = run_suite_command(f"--model={tiny_hf_dir}", "--suite=medical", f"--data_dir={data_dir}",
                             f"--out_dir={tmp_path / 'bench'}", env=subprocess_env(1), timeout=120)
    assert proc.returncode == 2
    # Files are checked before the model is loaded: the first medical task's missing file is reported first.
    assert "medqa_4options" in proc.stderr and "missing" in proc.stderr
    write_local_data(data_dir, [t for t in suite_tasks() if t != "pubmedqa"], n=2)
    proc = run_suite_command(f"--model={tiny_hf_dir}", "--suite=medical", f"--data_dir={data_dir}",
                             f"--out_dir={tmp_path / 'bench'}", env=subprocess_env(1), timeout=120)
    assert proc.returncode == 2
    assert f"error: {path}, record 1, field 'final_decision': missing" in proc.stderr
    assert not (tmp_path / "bench").exists()  # nothing written before the data is known good
