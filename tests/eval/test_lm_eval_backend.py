"""The `alpacare_jax` lm-eval backend equals the harness's own `hf` backend on the HF export of the same model.

Both run the same task configs (the suite's, over small local files) through `lm_eval.simple_evaluate`;
every request's response is compared: log-likelihoods within 1e-4 with the same `is_greedy`, identical
generated text, identical final metrics.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alpacare_jax.eval import tasks as tasks_lib
from tests.eval.fixtures import tiny_hf_dir, write_local_data  # noqa: F401 (fixture)
from tests.train.harness import REPO_ROOT, free_port, subprocess_env

# One worker computes the `hf` reference once for every test here.
pytestmark = pytest.mark.xdist_group("lm_eval_parity")

# A letter-answer multiple choice task, yes/no/maybe, MC2 (several true answers), rolling perplexity, and two
# generative tasks: BBH with stop strings that the random model hits, MeQSum (ROUGE-L) running to max_gen_toks.
PARITY_TASKS = ["mmlu_anatomy", "pubmedqa", "truthfulqa_mc2", "wikitext", "bbh_fewshot_boolean_expressions",
                "meqsum_rouge_l"]
OVERRIDES = {
    "bbh_fewshot_boolean_expressions": {"generation_kwargs": {"until": ["e", "\n\n"], "do_sample": False,
                                                              "max_gen_toks": 24}},
    "meqsum_rouge_l": {"generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 12}},
}


def run_tasks(model, task_names: list[str], data_dir: Path, config_dir: Path, **kwargs) -> dict:
    """`lm_eval.simple_evaluate` over the suite's task configs pointed at `data_dir`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    files = {t: tasks_lib.local_split_files(t, data_dir) for t in task_names}
    paths = tasks_lib.write_task_configs(task_names, config_dir, files, OVERRIDES)
    return lm_eval.simple_evaluate(model=model, tasks=[str(p) for p in paths], log_samples=True,
                                   task_manager=TaskManager(include_path=str(config_dir), include_defaults=False),
                                   **kwargs)


def responses(results: dict) -> dict[str, list]:
    """{task: every request's filtered response, in document then request order}."""
    out = {}
    for task, samples in results["samples"].items():
        out[task] = [resp for s in sorted(samples, key=lambda s: s["doc_id"]) for resp in s["filtered_resps"]]
    return out


def tolerance(reference: float) -> float:
    """1e-4, or two float32 rounding steps at the reference's size where that is coarser.

    The `hf` backend sums a window's token log-probabilities in float32: a document of a thousand tokens
    totals thousands of nats, where float32 itself resolves only ~5e-4.
    """
    return max(1e-4, 2 * float(np.spacing(np.float32(abs(float(reference))))))


def assert_same_results(ours: dict, reference: dict) -> None:
    got, expected = responses(ours), responses(reference)
    assert sorted(got) == sorted(expected)
    for task in expected:
        assert len(got[task]) == len(expected[task]) > 0, task
        for a, b in zip(got[task], expected[task]):
            if isinstance(b, str):
                assert a == b, (task, a, b)
            elif isinstance(b, (list, tuple)):  # (log-likelihood, is_greedy)
                assert abs(float(a[0]) - float(b[0])) <= tolerance(b[0]), (task, a, b)
                assert str(a[1]) == str(b[1]), (task, a, b)  # is_greedy (the CLI's sample files hold strings)
            else:  # rolling log-likelihood of a whole document
                assert abs(float(a) - float(b)) <= tolerance(b), (task, a, b)
    for task, metrics in reference["results"].items():
        for name, value in metrics.items():
            if isinstance(value, float) and "stderr" not in name and not math.isnan(value):
                np.testing.assert_allclose(ours["results"][task][name], value, rtol=1e-5, err_msg=f"{task} {name}")


@pytest.fixture(scope="module")
def hf_reference(tiny_hf_dir, tmp_path_factory):  # noqa: F811
    data_dir = write_local_data(tmp_path_factory.mktemp("bench_data"), PARITY_TASKS)
    results = run_tasks("hf", PARITY_TASKS, data_dir, tmp_path_factory.mktemp("hf_tasks"),
                        model_args=f"pretrained={tiny_hf_dir},dtype=float32", device="cpu", batch_size=8)
    return data_dir, results


def test_matches_hf_backend(tiny_hf_dir, hf_reference, tmp_path):  # noqa: F811
    from alpacare_jax.eval.lm_eval_backend import AlpacareJaxLM

    data_dir, reference = hf_reference
    # Batches of 3 rows (and decoding slots): several batches, mixed lengths, and a last, partly filled one;
    # rows of 128 tokens, so several sequences share a row but long ones do not fit with others.
    lm = AlpacareJaxLM(str(tiny_hf_dir), batch_size=3, pack_length=128)
    ours = run_tasks(lm, PARITY_TASKS, data_dir, tmp_path / "tasks")
    generated = responses(reference)["bbh_fewshot_boolean_expressions"]
    assert any(len(text) < 10 for text in generated), "no stop string was hit: the test would not check them"
    # Every way of scoring was used: packed sequences (yes/no, rolling windows), contexts shared by several
    # multi-token continuations (MC2), a prefix run once for the requests that share it (MMLU's instruction,
    # MC2's six-question primer, BBH's three worked examples before the generated answers), and decoding rows
    # stopped at a stop string.
    assert lm.work["packed forwards"] and lm.work["shared-context forwards"], lm.work
    assert lm.work["shared prefixes"] >= 3 and lm.work["forwards after a shared prefix"], lm.work
    assert lm.work["prefills after a shared prefix"], lm.work
    assert lm.work["rows stopped at a stop string"], lm.work
    assert_same_results(ours, reference)



@pytest.mark.slow
def test_lm_eval_command_line_on_fsdp_x_tensor_mesh(tiny_hf_dir, hf_reference, tmp_path):  # noqa: F811
    """The harness's own CLI, `--model alpacare_jax`, on 8 CPU devices as fsdp 4 x tensor 2."""
    data_dir, reference = hf_reference
    config_dir = tmp_path / "tasks"
    files = {t: tasks_lib.local_split_files(t, data_dir) for t in PARITY_TASKS}
    tasks_lib.write_task_configs(PARITY_TASKS, config_dir, files, OVERRIDES)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "alpacare_jax.eval", "lm_eval", "run", "--model", "alpacare_jax",
         "--model_args", f"model={tiny_hf_dir},fsdp=4,tensor=2", "--batch_size", "3", "--tasks", ",".join(PARITY_TASKS),
         "--include_path", str(config_dir), "--output_path", str(out), "--log_samples"],
        env=subprocess_env(8), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "alpacare_jax"
    results["samples"] = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).open()]
                          for task in PARITY_TASKS}
    assert_same_results(results, reference)


@pytest.mark.slow
def test_two_processes_of_four_devices(tiny_hf_dir, hf_reference, tmp_path):  # noqa: F811
    """jax.distributed on 127.0.0.1: one model over both processes' devices; process 0 alone gets results."""
    data_dir, reference = hf_reference
    out = tmp_path / "results.json"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.eval.backend_process", str(tiny_hf_dir), str(data_dir),
                               str(tmp_path / "tasks"), str(out), f"127.0.0.1:{port}", "2", str(i)],
                              env=subprocess_env(4), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-4000:]
    finally:
        for proc in procs:
            proc.kill()
    assert_same_results(json.loads(out.read_text()), reference)


def test_prefix_groups_share_only_what_precedes_every_scored_token():
    from alpacare_jax.eval.lm_eval_backend import MIN_PREFIX, _prefix_groups, _Sequence

    shots = tuple(range(100, 100 + 2 * MIN_PREFIX))  # a task's few-shot prompt
    questions = [_Sequence(shots + (i, 7, 8), span=2) for i in range(4)]
    short = _Sequence(shots[:MIN_PREFIX - 1] + (9, 9), span=1)  # shares too little with the others
    # Begins like the questions, but scores tokens from inside the shots: the prefix stops before them.
    early = _Sequence(shots + (0, 7), span=len(shots) - MIN_PREFIX + 2)
    groups = _prefix_groups([*questions, short, early], lambda s: len(s.tokens) - s.span)
    assert [(len(prefix), len(members)) for prefix, members in groups] == [(MIN_PREFIX, 5), (0, 1)]
    (prefix, members), (_, rest) = groups
    assert prefix == shots[:MIN_PREFIX] and rest == [short]
    assert set(map(id, members)) == set(map(id, [*questions, early]))
    # Without `early`, the whole few-shot prompt is shared.
    [(prefix, members), _] = _prefix_groups([*questions, short], lambda s: len(s.tokens) - s.span)
    assert prefix == shots and len(members) == 4
