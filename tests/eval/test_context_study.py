"""The contextual-prompting study end to end on CPU: questions -> `data_gen keywords` -> `data_gen contexts`
(from the local OpenAI-compatible test server) -> multiple-choice training of a tiny model -> the table.

The synthetic questions name a made-up finding and made-up diseases: which disease the finding belongs
to is known only to the test server (`ContextOracle`), so only the contexts carry the answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alpacare_jax.eval.context_study import privacy_budget, run_study
from tests.data_gen.fake_openai_server import FakeOpenAI
from tests.data_gen.mcq_synthetic import ContextOracle, make_questions
from tests.train.harness import DEMO_CONFIG, REPO_ROOT, cli_overrides, subprocess_env, tiny_config

pytest.importorskip("yake")  # the default keyword extractor


def _write_medqa(path: Path, questions) -> None:
    """The questions as a released MedQA file: no ids, so both sides key them by line number."""
    path.write_text("".join(json.dumps({"question": q.question, "options": q.options, "answer_idx": q.answer,
                                        "meta_info": "step1"}) + "\n" for q in questions))


def _data_gen(*args: str, cwd: Path, env: dict) -> None:
    proc = subprocess.run([sys.executable, "-m", "data_gen", *args, "--no-progress"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_questions_to_table(prepared, tmp_path):
    questions = make_questions(160, seed=3, with_identifiers=False)
    train_q, dev_q = questions[:128], questions[128:]
    _write_medqa(tmp_path / "train.jsonl", train_q)
    _write_medqa(tmp_path / "dev.jsonl", dev_q)
    server = FakeOpenAI(context_rule=ContextOracle(questions), lifetime=170.0)
    server.start()
    try:
        env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test-study",
                   PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for split in ("train", "dev"):
            _data_gen("keywords", "--in", f"{split}.jsonl", "--out", f"{split}_keywords.jsonl", cwd=tmp_path, env=env)
            _data_gen("contexts", "--keywords", f"{split}_keywords.jsonl", "--out", f"{split}_contexts.jsonl",
                      "--backoff-base", "0.02", "--timeout", "5", cwd=tmp_path, env=env)
    finally:
        server.stop()
    contexts = [json.loads(line) for line in (tmp_path / "dev_contexts.jsonl").read_text().splitlines()]
    assert sorted(int(c["id"]) for c in contexts) == list(range(len(dev_q)))  # MedQA line numbers

    config = tiny_config(prepared, num_train_steps=240, log_every=16, eval_every=16, early_stopping_patience=3)
    config.update_from_flattened_dict({
        "objective": "multiple_choice", "multiple_choice.format": "medqa",
        "multiple_choice.train_file": str(tmp_path / "train.jsonl"),
        "multiple_choice.eval_file": str(tmp_path / "dev.jsonl"), "multiple_choice.num_options": 4,
        "data.max_length": 288, "model.max_position_embeddings": 288,  # rows are ~280 tokens: nothing is cut
        "optimizer.learning_rate": 3e-3, "optimizer.warmup_ratio": 0.02})
    study_dir = tmp_path / "study"
    study = run_study(config, study_dir, keywords_file=tmp_path / "train_keywords.jsonl",
                      contexts_train=str(tmp_path / "train_contexts.jsonl"),
                      contexts_eval=str(tmp_path / "dev_contexts.jsonl"), seeds=[0], few_shot=[32], progress=False)

    full, few = (row.summary() for row in study.rows)
    assert (full["train_questions"], few["train_questions"]) == (128, 32)
    assert full["with_context"]["mean"] >= 0.9, full
    assert full["without_context"]["mean"] <= 0.45, full  # chance is 1/4
    assert few["without_context"]["mean"] <= 0.45, few
    assert study.privacy == privacy_budget(tmp_path / "train_keywords.jsonl")
    assert 0 < study.privacy.share <= 0.45
    table = (study_dir / "study.md").read_text()
    assert "| full | 128 |" in table and "| few-shot | 32 |" in table and "Privacy budget" in table
    assert json.loads((study_dir / "study.json").read_text()) == study.to_json()

    # The command, rerun on the same workdir, reuses every finished run and prints the same table.
    metrics = {p: p.read_text() for p in study_dir.rglob("metrics.jsonl")}
    assert len(metrics) == 4
    proc = subprocess.run(
        [sys.executable, "-m", "alpacare_jax.eval.context_study", f"--config={DEMO_CONFIG}", f"--workdir={study_dir}",
         f"--keywords={tmp_path / 'train_keywords.jsonl'}", f"--contexts_train={tmp_path / 'train_contexts.jsonl'}",
         f"--contexts_eval={tmp_path / 'dev_contexts.jsonl'}", "--seeds=0", "--few_shot=32", *cli_overrides(config)],
        env=subprocess_env(1), cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == table
    assert {p: p.read_text() for p in study_dir.rglob("metrics.jsonl")} == metrics  # nothing trained again
