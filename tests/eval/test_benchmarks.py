"""The benchmark suite command end to end: every task of the suite over small local files in each dataset's
own columns, AlpacaFarm judged through a real local OpenAI-compatible server, one table. Resumable task by
task (an interrupted run keeps what it scored); a result is reused only under the same provenance (data,
overrides); a second model under a stored name is refused; a malformed file stops with file, record and
field; on two processes only process 0 reads and writes the results. Also: what `export_data` writes, the
overrides, and `score_tasks` (a live model, in process) against the harness's `hf` backend."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpacare_jax.eval import tasks as tasks_lib
from alpacare_jax.eval.benchmarks import SuiteLayout, SuiteOptions, run_suite
from tests.data_gen.fake_openai_server import FakeOpenAI
from tests.eval.fixtures import _record, tiny_hf_dir, write_local_data  # noqa: F401 (fixture)
from tests.train.harness import REPO_ROOT, free_port, subprocess_env

SECRET = "sk-suite-test-key"


def suite_tasks() -> list[str]:
    return list(dict.fromkeys(t for b in tasks_lib.benchmarks() for t in b.tasks)) + [tasks_lib.ALPACA_FARM]


def suite_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "alpacare_jax.eval", "benchmarks", "--no_progress", *args]


def run_suite_command(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(suite_command(*args), env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def stamps(results: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in results.glob("*.json")}


@pytest.mark.slow
def test_suite_table_every_task_judged_alpaca_farm_and_resume(tiny_hf_dir, tmp_path):  # noqa: F811
    data_dir = write_local_data(tmp_path / "data", suite_tasks(), n=2)
    out_dir = tmp_path / "bench"
    results = out_dir / "tiny" / "results"
    args = [f"--model={tiny_hf_dir}", "--name=tiny", "--suite=all", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
            "--batch_size=8", "--max_new_tokens=8", "--max_gen_toks=8"]
    harness_tasks = len(suite_tasks()) - 1
    with FakeOpenAI(lifetime=900) as judge:
        env = dict(subprocess_env(1), OPENAI_BASE_URL=judge.base_url, OPENAI_API_KEY=SECRET)
        # Interrupted (killed, as a preempted VM) in the middle of MMLU's 57 subjects.
        interrupted = subprocess.Popen(suite_command(*args), env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        try:
            while len(list(results.glob("mmlu_*.json"))) < 12 and interrupted.poll() is None:
                time.sleep(0.05)
        finally:
            interrupted.send_signal(signal.SIGKILL)
            interrupted.wait()
        before = stamps(results)
        assert 12 <= len(before) < harness_tasks, "the run was not interrupted half way: nothing is tested"

        first = run_suite_command(*args, env=env)
        assert first.returncode == 0, first.stderr[-4000:]
        after = stamps(results)
        assert len(after) == harness_tasks
        assert {k: after[k] for k in before} == before  # what the interrupted run scored was not scored again
        requests = len(judge.ledger)

        second = run_suite_command(*args, env=env)
        assert second.returncode == 0, second.stderr[-4000:]
        assert len(judge.ledger) == requests == 4  # two AlpacaFarm answers, both orders; then the caches
        assert "tasks)" not in second.stderr and "AlpacaFarm: " not in second.stderr  # nothing was recomputed
        assert stamps(results) == after

        # Other shots for one benchmark, other data for one task: those tasks, and only those, again.
        write_local_data(data_dir, ["pubmedqa"], n=2, seed=7)
        third = run_suite_command(*args, "--num_fewshot=MMLU-medical=1", env=env)
        assert third.returncode == 0, third.stderr[-4000:]
        assert len(judge.ledger) == requests
    assert "tiny: MMLU-medical (6 tasks)" in third.stderr and "tiny: PubMedQA (1 tasks)" in third.stderr
    assert third.stderr.count("tasks)") == 2, third.stderr
    changed = {k for k, v in stamps(results).items() if v != after[k]}
    assert changed == {"pubmedqa.json", *(f"mmlu_{s}.json" for s in tasks_lib.MMLU_MEDICAL)}
    assert SECRET not in first.stdout + first.stderr + "".join(p.read_text() for p in out_dir.rglob("*.json*"))

    layout = SuiteLayout(out_dir)
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
    assert row["MMLU-medical"]["shots"] == [1] and row["MMLU-medical"]["overrides"] == ["num_fewshot=1"]
    assert row["MMLU"]["shots"] == [0, 1]  # its six medical subjects are the ones just scored with a shot
    markdown = (out_dir / "benchmarks.md").read_text()
    for title in titles + ["Medical avg", "General avg", "| tiny |", "| MMLU-medical | acc | 1 | num_fewshot=1 |"]:
        assert title in markdown
    assert markdown in third.stdout

    # Another model under the stored name: refused before anything is loaded or written.
    other = tmp_path / "other_model"
    shutil.copytree(tiny_hf_dir, other)
    with pytest.raises(ValueError, match=f"{layout.model_record('tiny')}: the scores under 'tiny' are of "
                                         f"{tiny_hf_dir}.*pass another --name"):
        run_suite(str(other), layout, SuiteOptions(data_dir=data_dir), name="tiny")


@pytest.mark.slow
@pytest.mark.extended
def test_two_processes_only_process_zero_reads_and_writes(tiny_hf_dir, tmp_path):  # noqa: F811
    """Process 1 gets an out_dir of its own (a TPU VM's local disk): it must follow process 0's decisions
    (what is stored, which AlpacaFarm answers exist) and leave its own disk untouched."""
    data_dir = write_local_data(tmp_path / "data", ["pubmedqa", tasks_lib.ALPACA_FARM], n=2)
    reference = data_dir / tasks_lib.ALPACA_FARM / "eval.jsonl"
    both_rows = reference.read_text()
    reference.write_text(both_rows.splitlines(keepends=True)[0])  # the first run sees one AlpacaFarm row
    out_dirs = [tmp_path / "bench0", tmp_path / "bench1"]

    def run(judge: FakeOpenAI) -> list[str]:
        port = free_port()
        env = dict(subprocess_env(4), OPENAI_BASE_URL=judge.base_url, OPENAI_API_KEY=SECRET)
        procs = [subprocess.Popen(suite_command(
            f"--model={tiny_hf_dir}", "--name=tiny", "--benchmarks=PubMedQA,AlpacaFarm", f"--data_dir={data_dir}",
            f"--out_dir={out_dirs[i]}", "--batch_size=8",
            "--max_new_tokens=8", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}"), env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
        try:
            outputs = [proc.communicate(timeout=300) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
        for proc, (_, err) in zip(procs, outputs):
            assert proc.returncode == 0, err[-4000:]
        return [err for _, err in outputs]

    with FakeOpenAI(lifetime=900) as judge:
        run(judge)
        # Process 0 has PubMedQA and one AlpacaFarm answer stored, process 1 nothing: both must skip PubMedQA
        # and resume AlpacaFarm from process 0's answer, or their collectives would not match.
        reference.write_text(both_rows)
        stderr0, _ = run(judge)
    assert "PubMedQA (1 tasks)" not in stderr0 and "AlpacaFarm: 1 answered" in stderr0 and "1 already done" in stderr0
    assert list(out_dirs[1].rglob("*")) == []
    row = json.loads((out_dirs[0] / "benchmarks.json").read_text())["rows"]["tiny"]
    assert row["PubMedQA"]["n"] == 2 and row["AlpacaFarm"]["n"] == 2 and row["AlpacaFarm"]["complete"]


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
    # Shots asked for, but not the split they are drawn from: stopped, naming the file.
    proc = run_suite_command(f"--model={tiny_hf_dir}", "--suite=medical", f"--data_dir={data_dir}",
                             "--benchmarks=MedMCQA", "--num_fewshot=medmcqa=2", f"--out_dir={tmp_path / 'bench'}",
                             env=subprocess_env(1), timeout=120)
    assert proc.returncode == 2
    assert (f"error: {data_dir / 'medmcqa' / 'train.jsonl'}: missing (the MedMCQA task medmcqa takes its shots "
            "from its 'train' split)") in proc.stderr
    assert not (tmp_path / "bench").exists()  # nothing written before the data is known good


def test_overrides_by_benchmark_task_or_all():
    suite = tasks_lib.suite_benchmarks("all")
    named = tasks_lib.merge_overrides(tasks_lib.parse_num_fewshot("2"), tasks_lib.parse_num_fewshot("MMLU=5"),
                                      {"mmlu_anatomy": {"num_fewshot": 1, "description": "Anatomy."}})
    expanded = tasks_lib.expand_overrides(named, suite)
    assert expanded["pubmedqa"] == {"num_fewshot": 2}
    assert expanded["mmlu_virology"] == expanded["mmlu_college_medicine"] == {"num_fewshot": 5}  # MMLU's too
    assert expanded["mmlu_anatomy"] == {"num_fewshot": 1, "description": "Anatomy."}  # the task's own wins
    with pytest.raises(ValueError, match="MMLU_medical"):  # a typo would change nothing: refused
        tasks_lib.expand_overrides({"MMLU_medical": {"num_fewshot": 5}}, suite)
    with pytest.raises(ValueError, match="mmlu_anatomy is in several benchmarks"):
        tasks_lib.expand_overrides({"MMLU": {"num_fewshot": 5}, "MMLU-medical": {"num_fewshot": 3}}, suite)
    with pytest.raises(ValueError, match="'MMLU=five' is not NAME=N"):
        tasks_lib.parse_num_fewshot("MMLU=five")


def test_export_writes_only_the_splits_the_suite_reads(tmp_path):
    """`export_data` over tiny in-memory `datasets` (the hub's place taken by a loader): the evaluated split
    of every task, and the shots' split only where shots are asked for; the files pass the suite's checks."""
    import datasets

    suite = tasks_lib.suite_benchmarks("all")
    overrides = tasks_lib.expand_overrides({"MedMCQA": {"num_fewshot": 2}, "MMLU": {"num_fewshot": 5}}, suite)
    owners = {}
    for task in suite_tasks()[:-1]:
        config = tasks_lib.effective_config(task, overrides)
        owners[(config["dataset_path"], config.get("dataset_name"))] = task
    path, name, _ = tasks_lib.ALPACA_FARM_HUB
    owners[(path, name)] = tasks_lib.ALPACA_FARM
    asked = []

    def load_dataset(path, name=None, *, split, **kwargs):
        asked.append((owners[(path, name)], split))
        rng = random.Random(len(asked))
        return datasets.Dataset.from_list([_record(owners[(path, name)], split, i, rng) for i in range(3)])

    written = tasks_lib.export_data(tmp_path, "all", overrides, load_dataset=load_dataset)
    assert len(asked) == len(written)  # one download per file written
    splits = {task: sorted(p.stem for p in (tmp_path / task).glob("*.jsonl")) for task in suite_tasks()}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == sorted(
        f"{task}/{split}.jsonl" for task, names in splits.items() for split in names)
    assert splits["medmcqa"] == ["train", "validation"]  # shots asked for: drawn from the training split
    assert splits["medqa_4options"] == ["test"] and splits["pubmedqa"] == ["test"]  # no shots: no 10k-row train
    assert splits["mmlu_anatomy"] == ["dev", "test"] and splits["bbh_fewshot_snarks"] == ["test"]  # BBH: in YAML
    assert splits[tasks_lib.ALPACA_FARM] == ["eval"]
    for task in suite_tasks()[:-1]:
        assert tasks_lib.check_data(task, tmp_path, overrides).keys() == set(splits[task])


def test_score_tasks_of_a_live_model_equal_the_hf_backend(tiny_hf_dir, tmp_path):  # noqa: F811
    """What a training hook calls: the model in memory, on a mesh, a few tasks; the harness's `hf` backend on
    the same weights gives the same scores."""
    import lm_eval

    from alpacare_jax import sharding
    from alpacare_jax.eval.scoring import score_tasks, task_manager
    from alpacare_jax.infer.loading import load_model

    tasks = ["pubmedqa", "mmlu_anatomy", "truthfulqa_mc2"]
    data_dir = write_local_data(tmp_path / "data", tasks, n=3)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
    loaded = load_model(tiny_hf_dir, mesh=mesh)
    scores = score_tasks(loaded.model, loaded.tokenizer, tasks, limit=2, mesh=mesh, data_dir=data_dir)
    assert list(scores) == ["pubmedqa/acc", "mmlu_anatomy/acc", "truthfulqa_mc2/acc"]

    files = {t: tasks_lib.local_split_files(t, data_dir) for t in tasks}
    tasks_lib.write_task_configs(tasks, tmp_path / "configs", files)
    reference = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_hf_dir},dtype=float32",
                                        device="cpu", tasks=[str(tmp_path / "configs" / f"{t}.yaml") for t in tasks],
                                        limit=2, task_manager=task_manager(tmp_path / "configs"))
    for task in tasks:
        assert scores[f"{task}/acc"] == pytest.approx(reference["results"][task]["acc,none"], abs=1e-9), task
