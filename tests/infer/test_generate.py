"""`python -m alpacare_jax.infer.generate`: the same answers from a workdir and its HF export, resume after SIGKILL,
and input errors that name the file, record and field."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from alpacare_jax.infer import generate
from data_gen.errors import DataError
from tests.infer.fixtures import (  # noqa: F401
    GROUP,
    MODEL_NAME,
    REPO_ROOT,
    run_module,
    subprocess_env,
    test_sets_dir,
    trained,
)

ROWS = 6
FLAGS = [f"--limit={ROWS}", "--batch_size=2", "--max_new_tokens=24", "--no_progress"]


def _args(model, data_dir, out, *extra):
    return [f"--model={model}", "--dataset=medinstruct_test", f"--data_dir={data_dir}", f"--out={out}", *FLAGS, *extra]


@pytest.fixture(scope="module")
def workdir_outputs(trained, test_sets_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("generate") / "workdir.json"
    proc = run_module("alpacare_jax.infer.generate", *_args(trained, test_sets_dir, out))
    assert f"{ROWS} answered" in proc.stdout and "0 already done" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


@GROUP
@pytest.mark.slow
def test_outputs_follow_the_test_set_and_the_contract(workdir_outputs, test_sets_dir):  # noqa: F811
    rows = generate.load_tasks("medinstruct_test", data_dir=str(test_sets_dir), limit=ROWS)
    assert [r["id"] for r in workdir_outputs] == [t.id for t in rows]
    for record, task in zip(workdir_outputs, rows):
        assert set(record) == {"id", "instruction", "input", "output", "generator"}
        expected = (task.instruction, task.input, MODEL_NAME)
        assert (record["instruction"], record["input"], record["generator"]) == expected
        assert record["output"]  # the barely trained model never stops early: every answer has text


def test_answered_all_only_when_every_task_is_stored_unchanged(tmp_path):
    tasks = [generate.Task(id=i, instruction=f"question {i}") for i in range(3)]
    out = tmp_path / "out.json"
    assert not generate.answered_all(out, tasks)  # nothing written yet
    out.write_text(json.dumps([{"id": t.id, "instruction": t.instruction, "input": "", "output": "a"} for t in tasks]))
    assert generate.answered_all(out, tasks) and generate.answered_all(out, tasks[:2])
    assert not generate.answered_all(out, tasks + [generate.Task(id=3, instruction="question 3")])
    assert not generate.answered_all(out, [generate.Task(id=0, instruction="another question")])


@GROUP
@pytest.mark.slow
def test_hf_export_gives_the_same_outputs_as_the_workdir(workdir_outputs, trained, test_sets_dir, tmp_path):  # noqa: F811
    out = tmp_path / "hf.json"
    run_module("alpacare_jax.infer.generate", *_args(trained / "hf", test_sets_dir, out, f"--name={MODEL_NAME}"))
    assert json.loads(out.read_text()) == workdir_outputs


@GROUP
@pytest.mark.slow
def test_rerun_after_sigkill_answers_only_the_rest(workdir_outputs, trained, test_sets_dir, tmp_path):  # noqa: F811
    out = tmp_path / "killed.json"
    partial = generate.partial_path(out)
    # Polling for the first stored batch and then killing raced with a fast decoder that finished all three
    # batches between two polls. So the process kills itself with a real SIGKILL right after its second
    # stored row: the first batch is stored, nothing after it.
    kill_after_first_batch = (
        "import os, runpy, signal, sys; from data_gen.store import JsonlStore; append = JsonlStore.append\n"
        "def append_then_die(self, record):\n"
        "    append(self, record)\n"
        "    if len(self.records) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "JsonlStore.append = append_then_die; sys.argv[0] = 'generate'\n"
        "runpy.run_module('alpacare_jax.infer.generate', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", kill_after_first_batch, *_args(trained, test_sets_dir, out)],
                          env=subprocess_env(1), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists()
    stored = partial.read_text().count("\n")
    assert stored == 2
    with partial.open("a") as f:
        f.write('{"key": "9", "id": 9, "instr')  # a write cut short by the kill: dropped on resume

    rerun = run_module("alpacare_jax.infer.generate", *_args(trained, test_sets_dir, out))
    assert f"{ROWS - stored} answered" in rerun.stdout and f"{stored} already done" in rerun.stdout, rerun.stdout
    assert json.loads(out.read_text()) == workdir_outputs
    assert not partial.exists()
    again = run_module("alpacare_jax.infer.generate", *_args(trained, test_sets_dir, out))  # finished: nothing to do
    assert "0 answered" in again.stdout and f"{ROWS} already done" in again.stdout


def test_bad_task_files_name_the_file_record_and_field(tmp_path):
    cases = {
        "missing.jsonl": ('{"instruction": "a"}\n{"input": "b"}\n', "record 1, field 'instruction'"),
        "input.json": ('[{"instruction": "a", "input": 3}]', "record 0, field 'input'"),
        "dup.json": ('[{"instruction": "a", "id": 1}, {"instruction": "b", "id": 1}]', "record 1, field 'id'"),
        "list.json": ('[{"instruction": "a"}, 5]', "record 1"),
    }
    for name, (text, where) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError) as error:
            generate.load_task_file(path)
        assert str(path) in str(error.value) and where in str(error.value), str(error.value)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"instruction": "a", "input": "<noinput>"}\n{"instruction": "b", "id": "x7"}\n')
    assert [(t.id, t.input) for t in generate.load_task_file(ok)] == [(0, "<noinput>"), ("x7", "")]
    # The command line reports it (exit 2) before loading any model.
    args = ["--model=none", f"--dataset={tmp_path / 'missing.jsonl'}", f"--out={tmp_path / 'o.json'}"]
    assert generate.main(args) == 2
    assert generate.main(["--model=none", "--dataset=no_such_set", f"--out={tmp_path / 'o.json'}"]) == 2
