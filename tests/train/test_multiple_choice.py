"""The multiple-choice objective in the trainer: contexts carry the answer, early stopping, SIGKILL resume."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from alpacare_jax import export_hf
from alpacare_jax.data import multiple_choice
from alpacare_jax.data.tokenizer import load_tokenizer
from alpacare_jax.train.loop import train
from alpacare_jax.train.metrics import read_metrics
from tests.train.harness import run_train, subprocess_env, tiny_config, train_command
from tests.train.mcq_synthetic import mcq_overrides
from tests.train.test_processes import _committed_steps, _wait_for


def _accuracies(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_accuracy"] for r in read_metrics(workdir) if "eval_accuracy" in r}


def test_contexts_carry_the_answer_and_early_stopping_ends_the_run(prepared, tmp_path, caplog):
    """With the per-option contexts the dev accuracy reaches >= 0.9 and the run stops once it no longer
    improves (a restart then trains no further); without them the same recipe stays near chance (1/4)."""
    caplog.set_level(logging.INFO, logger="alpacare_jax")
    recipe = dict(num_train_steps=400, log_every=8, eval_every=16, early_stopping_patience=2)
    recipe.update({"optimizer.learning_rate": 3e-3, "optimizer.warmup_ratio": 0.02})
    with_context = tmp_path / "with_context"
    train(tiny_config(prepared, **mcq_overrides(tmp_path / "data", with_context=True), **recipe), with_context)
    accuracy = _accuracies(with_context)
    best_step = max(accuracy, key=accuracy.get)
    assert accuracy[best_step] >= 0.9, accuracy
    last_step = max(accuracy)
    assert last_step == best_step + 2 * 16 < 400, accuracy  # stopped after 2 evaluations without a better one
    assert f"early stopping at step {last_step}" in caplog.text

    train(tiny_config(prepared, **mcq_overrides(tmp_path / "data", with_context=True), **recipe), with_context)
    assert max(r["step"] for r in read_metrics(with_context)) == last_step  # the stop survives a restart
    _hf_export_answers_like_the_run(with_context, tmp_path / "hf", accuracy[last_step])

    without_context = tmp_path / "without_context"
    recipe.update(num_train_steps=last_step, early_stopping_patience=0, eval_every=-1)  # -1: once per epoch
    train(tiny_config(prepared, **mcq_overrides(tmp_path / "data", with_context=False), **recipe), without_context)
    accuracy = _accuracies(without_context)
    assert sorted(accuracy) == sorted({*range(32, last_step + 1, 32), last_step})  # 256 questions / 8 per step
    assert max(accuracy.values()) <= 0.45, accuracy


def test_a_test_split_is_scored_beside_dev_at_every_evaluation(prepared, tmp_path):
    """With `multiple_choice.test_file` set, every evaluation also logs `test_loss` / `test_accuracy`. The
    test file here is the dev file itself, so the two must agree exactly (same questions, same scoring)."""
    overrides = mcq_overrides(tmp_path / "data", with_context=True)
    overrides.update({"multiple_choice.test_file": overrides["multiple_choice.eval_file"],
                      "multiple_choice.test_contexts_file": overrides["multiple_choice.eval_contexts_file"]})
    workdir = tmp_path / "run"
    train(tiny_config(prepared, **overrides, num_train_steps=16, eval_every=8), workdir)
    evaluations = [r for r in read_metrics(workdir) if "eval_accuracy" in r]
    assert [r["step"] for r in evaluations] == [8, 16]
    for record in evaluations:
        assert (record["test_accuracy"], record["test_loss"]) == (record["eval_accuracy"], record["eval_loss"])
    assert not [r for r in read_metrics(workdir) if "test_accuracy" in r and "eval_accuracy" not in r]


def _hf_export_answers_like_the_run(workdir: Path, out: Path, dev_accuracy: float) -> None:
    """`export_hf` of the workdir, loaded by transformers as a sequence classifier, answers the dev split
    with the accuracy the run logged."""
    import torch
    import transformers

    assert export_hf.main([f"--workdir={workdir}", f"--out={out}", "--dtype=float32"]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    config = json.loads((workdir / "config.json").read_text())
    encode = multiple_choice.QuestionEncoder(load_tokenizer(out), config["data"]["max_length"], 4)
    questions = multiple_choice.load_split(ml_collections.ConfigDict(config["multiple_choice"]), "eval")
    rows = [encode(q) for q in questions]
    with torch.no_grad():
        scores = model(torch.as_tensor(np.stack([r["input_ids"] for r in rows]).reshape(-1, encode.max_length),
                                       dtype=torch.long)).logits.reshape(len(rows), 4).numpy()
    hf_accuracy = np.mean(scores.argmax(-1) == [q.answer for q in questions])
    assert hf_accuracy == pytest.approx(dev_accuracy, abs=1e-9)


@pytest.mark.slow
def test_sigkill_then_restart_matches_uninterrupted_run(prepared, tmp_path):
    n = 3
    config = tiny_config(prepared, **mcq_overrides(tmp_path / "data", with_context=True), num_train_steps=4 * n,
                         checkpoint_every=1, keep_checkpoints=2, eval_every=4)
    reference = tmp_path / "reference"
    train(config, reference)  # uninterrupted, in this process (same 8-device mesh as the subprocess)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(config, killed), env=subprocess_env(8), cwd=Path(__file__).parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: n in _committed_steps(killed), proc, 180, f"the step-{n} checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    last_committed = max(_committed_steps(killed))
    assert n <= last_committed < 4 * n, "the run finished before it could be killed mid-way"

    restarted = run_train(config, killed)
    resumed_at = int(restarted.stdout.split("resumed from step ")[1].split()[0])
    assert n <= resumed_at < 4 * n
    expected, got = read_metrics(reference), read_metrics(killed)
    assert [r["step"] for r in got] == list(range(1, 4 * n + 1))
    for key in ("loss", "grad_norm", "eval_loss", "eval_accuracy"):
        want = [r[key] for r in expected if key in r]
        assert want and [r[key] for r in got if key in r] == pytest.approx(want, rel=1e-6, abs=0), key


def test_sharded_and_accumulated_step_matches_single_device(prepared, tmp_path):
    """The multiple-choice step on an (fsdp=4, tensor=2) mesh, whole or in 2 micro-batches, equals one device."""
    import jax
    from jax.sharding import PartitionSpec as P

    from alpacare_jax import sharding
    from alpacare_jax.data import pipeline
    from alpacare_jax.train import state as state_lib
    from alpacare_jax.train import step as step_lib
    from alpacare_jax.train.config import llama_config

    config = tiny_config(prepared, **mcq_overrides(tmp_path / "data", with_context=True))
    batch = next(multiple_choice.make_train_iterator(config, load_tokenizer(config.tokenizer)))

    def three_steps(devices, mesh, accum_steps):
        config.mesh.update(mesh)
        config.grad_accum_steps = accum_steps
        program = step_lib.build_train_program(config, llama_config(config), 10, devices)
        state = state_lib.init_train_state(program.setup, llama_config(config), program.tx, seed=0)
        spec = sharding.logical_to_spec(program.objective.batch_axes)
        global_batch = pipeline.to_global_batch(batch, program.setup.mesh, spec)
        losses = []
        for _ in range(3):
            state, metrics = program.train_step(state, global_batch)
            losses.append(float(metrics["loss"]))
        return state, losses

    one_state, one_losses = three_steps(jax.devices()[:1], dict(data=1, fsdp=1, tensor=1), 1)
    for accum_steps in (1, 2):
        state, losses = three_steps(jax.devices(), dict(data=1, fsdp=4, tensor=2), accum_steps)
        np.testing.assert_allclose(losses, one_losses, rtol=1e-5, atol=1e-5)
        for ours, reference in zip(jax.tree.leaves(state.params), jax.tree.leaves(one_state.params)):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5, rtol=0)
    assert state.params["score"].sharding.spec == P("fsdp", None)  # ("embed", "classes")
    assert one_losses[2] < one_losses[0]
