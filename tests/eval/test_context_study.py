"""The contextual-prompting study: its plan (the config's own training set for "full", few-shot splits x seeds),
the dev-selected result of a run, and the whole chain on CPU: questions -> `data_gen keywords` ->
`data_gen contexts` (from the local OpenAI-compatible test server) -> multiple-choice training of a tiny
model -> the table.

The synthetic questions name a made-up finding and made-up diseases: which disease the finding belongs
to is known only to the test server (`ContextOracle`), so only the contexts carry the answer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from alpacare_jax.data import multiple_choice
from alpacare_jax.eval.context_study import (
    FULL,
    Contexts,
    PlannedRun,
    plan,
    privacy_budget,
    run_config,
    run_study,
    selected_evaluation,
)
from tests.data_gen.fake_openai_server import FakeOpenAI
from tests.data_gen.mcq_synthetic import ContextOracle, make_questions
from tests.train.harness import DEMO_CONFIG, REPO_ROOT, cli_overrides, subprocess_env, tiny_config

NO_CONTEXTS = Contexts(train="train_contexts.jsonl", eval="dev_contexts.jsonl")


def _config_file(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_full_keeps_the_configs_training_set_and_few_shot_draws_each_split(tmp_path):
    """MedMCQA's "full" is the paper's random 10k subset, not the whole ~180k split."""
    config = _config_file("mcq_medmcqa")
    assert config.multiple_choice.train_size == 10_000
    full = run_config(config, PlannedRun(context=False, train_size=FULL, split=0, seed=2), NO_CONTEXTS)
    assert (full.multiple_choice.train_size, full.multiple_choice.subset_seed) == (10_000, 0)
    assert (full.seed, full.data.seed) == (2, 2)  # the head's initialisation and the batch order
    assert full.multiple_choice.train_contexts_file == full.multiple_choice.eval_contexts_file == ""
    few = run_config(config, PlannedRun(context=True, train_size=100, split=2, seed=1), NO_CONTEXTS)
    assert (few.multiple_choice.train_size, few.multiple_choice.subset_seed, few.seed) == (100, 2, 1)
    assert few.multiple_choice.train_contexts_file == "train_contexts.jsonl"

    # On a released-format file: full = the config's subset; few-shot splits differ, seeds share a split.
    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Question {i}?", "opa": "a", "opb": "b",
                                        "opc": "c", "opd": "d", "cop": 1 + i % 4}) + "\n" for i in range(300)))
    config.multiple_choice.train_file = str(path)
    config.multiple_choice.train_size = 200
    ids = lambda run: [q.id for q in multiple_choice.load_split(  # noqa: E731
        run_config(config, run, NO_CONTEXTS).multiple_choice, "train")]
    assert len(ids(PlannedRun(False, FULL, 0, 0))) == 200
    splits = [ids(PlannedRun(False, 100, split, seed)) for split, seed in ((0, 0), (1, 0), (2, 0), (0, 1))]
    assert [len(s) for s in splits] == [100] * 4
    assert splits[0] != splits[1] != splits[2] != splits[0] and splits[3] == splits[0]


def test_plan_crosses_few_shot_splits_with_seeds():
    config = _config_file("mcq_medqa")
    runs = plan(config, seeds=(0, 1, 2), few_shot=(100, 200, 500), splits=(0, 1, 2))
    assert len(runs) == 2 * 3 + 3 * 2 * 3 * 3  # full: context x seeds; few-shot: size x context x splits x seeds
    assert len({r.name for r in runs}) == len(runs)
    cells = Counter((r.train_size, r.context) for r in runs)
    assert cells[FULL, True] == cells[FULL, False] == 3
    for size in (100, 200, 500):
        for context in (False, True):
            assert cells[size, context] == 9
            assert {(r.split, r.seed) for r in runs if (r.train_size, r.context) == (size, context)} == {
                (split, seed) for split in range(3) for seed in range(3)}


def test_a_run_reports_the_test_accuracy_of_its_dev_selected_evaluation():
    records = [{"step": 5, "loss": 1.3},
               {"step": 10, "eval_accuracy": 0.5, "test_accuracy": 0.40},
               {"step": 20, "eval_accuracy": 0.7, "test_accuracy": 0.65},  # the first best: early stopping's pick
               {"step": 30, "eval_accuracy": 0.7, "test_accuracy": 0.80},
               {"step": 40, "eval_accuracy": 0.6, "test_accuracy": 0.90}]  # the last, and the best on test
    assert selected_evaluation(records, with_test=True, source="m") == (20, 0.7, 0.65)
    assert selected_evaluation(records, with_test=False, source="m") == (20, 0.7, None)
    no_test = [{k: v for k, v in r.items() if k != "test_accuracy"} for r in records]
    with pytest.raises(ValueError, match=r"runs/x/metrics.jsonl: the evaluation at step 20 has no test_accuracy"):
        selected_evaluation(no_test, with_test=True, source="runs/x/metrics.jsonl")
    with pytest.raises(ValueError, match="logged no eval_accuracy"):
        selected_evaluation(records[:1], with_test=False, source="m")


def _write_medqa(path: Path, questions) -> None:
    """The questions in MedQA's released layout, with an `id` each (what CONTEXTS lines are joined on)."""
    path.write_text("".join(json.dumps({"id": q.id, "question": q.question, "options": q.options,
                                        "answer_idx": q.answer, "meta_info": "step1"}) + "\n" for q in questions))


def _data_gen(*args: str, cwd: Path, env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "data_gen", *args, "--no-progress"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory) -> Path:
    """128 training and 32 dev questions, their keywords and their contexts (one `data_gen` run each for all)."""
    pytest.importorskip("yake")  # the default keyword extractor
    root = tmp_path_factory.mktemp("context_study")
    questions = make_questions(160, seed=3, with_identifiers=False)
    _write_medqa(root / "questions.jsonl", questions)
    _write_medqa(root / "train.jsonl", questions[:128])
    _write_medqa(root / "dev.jsonl", questions[128:])
    server = FakeOpenAI(context_rule=ContextOracle(questions), lifetime=120.0)
    server.start()
    try:
        env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test-study",
                   PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        _data_gen("keywords", "--in", "questions.jsonl", "--out", "keywords.jsonl", cwd=root, env=env)
        _data_gen("contexts", "--keywords", "keywords.jsonl", "--out", "contexts.jsonl", "--backoff-base", "0.02",
                  "--timeout", "5", cwd=root, env=env)
    finally:
        server.stop()
    contexts = [json.loads(line) for line in (root / "contexts.jsonl").read_text().splitlines()]
    assert sorted(c["id"] for c in contexts) == sorted(q.id for q in questions)
    return root


def test_questions_to_table(prepared, study_inputs, tmp_path):
    root = study_inputs
    # One layer is enough to read the option's context a few tokens before the row's end; 4 questions per
    # step and early stopping keep each run to a few dozen steps.
    config = tiny_config(prepared, num_train_steps=64, log_every=8, eval_every=8, early_stopping_patience=2)
    config.update_from_flattened_dict({
        "objective": "multiple_choice", "multiple_choice.format": "medqa",
        "multiple_choice.train_file": str(root / "train.jsonl"),
        "multiple_choice.eval_file": str(root / "dev.jsonl"), "multiple_choice.num_options": 4,
        "model.num_layers": 1, "data.global_batch_size": 4,
        "data.max_length": 288, "model.max_position_embeddings": 288,  # rows are ~280 tokens: nothing is cut
        "optimizer.learning_rate": 3e-3, "optimizer.warmup_ratio": 0.02})
    contexts = Contexts(train=str(root / "contexts.jsonl"), eval=str(root / "contexts.jsonl"))
    grid = {"seeds": [0, 1], "few_shot": [32], "splits": [0]}  # more splits: see test_plan_crosses_...
    study_dir = tmp_path / "study"

    # The command, on one CPU device; its runs share one compilation cache (they compile the same programs).
    env = {**subprocess_env(1), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "alpacare_jax.eval.context_study", f"--config={DEMO_CONFIG}", f"--workdir={study_dir}",
         f"--keywords={root / 'keywords.jsonl'}", f"--contexts_train={contexts.train}",
         f"--contexts_eval={contexts.eval}", *(f"--{k}={','.join(map(str, v))}" for k, v in grid.items()),
         *cli_overrides(config)], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (study_dir / "study.md").read_text()
    assert proc.stdout == table

    # Run again (here, in this process): every finished run is reused, nothing is trained again.
    metrics = {p: p.read_text() for p in study_dir.rglob("metrics.jsonl")}
    assert len(metrics) == 2 * 2 + 2 * 1 * 2  # full: context x seeds; few-shot: context x splits x seeds
    study = run_study(config, study_dir, keywords_file=root / "keywords.jsonl", contexts=contexts, progress=False,
                      **grid)
    assert study.to_markdown() == table
    assert {p: p.read_text() for p in study_dir.rglob("metrics.jsonl")} == metrics
    assert json.loads((study_dir / "study.json").read_text()) == study.to_json()

    full, few = (row.summary() for row in study.rows)
    assert (full["train_questions"], few["train_questions"]) == (128, 32)
    assert len(full["with_context"]["runs"]) == len(few["without_context"]["runs"]) == 2
    assert min(full["with_context"]["runs"]) >= 0.9, full
    assert full["without_context"]["mean"] <= 0.45, full  # chance is 1/4
    assert few["without_context"]["mean"] <= 0.45, few
    runs = full["without_context"]["runs"]
    assert full["without_context"]["std"] == pytest.approx(abs(runs[0] - runs[1]) / 2 ** 0.5)  # sample std of two
    assert study.privacy == privacy_budget(root / "keywords.jsonl")
    assert 0 < study.privacy.share <= 0.45
    assert "| full | 128 |" in table and "| few-shot | 32 |" in table
    assert ("Dev accuracy (%) of the model selected on it. Full: mean ± std over seeds 0, 1 (2 runs per cell). "
            "Few-shot: over 1 random training split (0) x 2 seeds (2 runs per cell). Privacy budget") in table
