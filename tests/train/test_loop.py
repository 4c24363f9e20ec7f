"""The loop in-process: workdir contents, metrics, eval, resume past a corrupt checkpoint, export to HF."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from alpacare_jax import export_hf
from alpacare_jax.train.loop import train
from alpacare_jax.train.metrics import read_metrics
from alpacare_jax.workdir import Workdir
from tests.train.harness import hf_logits_match, restore_model, tiny_config


@pytest.fixture(scope="module")
def short_run(prepared, tmp_path_factory):
    """4 steps, checkpoints at 2 and 4, eval at 2 and 4."""
    workdir = tmp_path_factory.mktemp("short_run")
    config = tiny_config(prepared, num_train_steps=4, checkpoint_every=2, eval_every=2)
    train(config, workdir)
    return config, workdir


def test_workdir_holds_metrics_checkpoints_and_model_description(short_run):
    config, workdir = short_run
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert {"loss", "learning_rate", "tokens_per_second", "grad_norm", "flops_per_second"} <= set(record)
        assert record["tokens_per_second"] > 0 and np.isfinite(record["loss"])
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert records[0]["learning_rate"] == 0.0 and records[1]["learning_rate"] == pytest.approx(1e-3)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "tokenizer" / "tokenizer.model").exists()
    assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 4
    assert Workdir(workdir).model_config().hidden_size == config.model.hidden_size


def test_corrupt_latest_checkpoint_falls_back_to_previous(short_run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="alpacare_jax")
    config, source = short_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    damaged = workdir / "checkpoints" / "4" / "params"
    data_files = [p for p in damaged.rglob("*") if p.is_file() and p.parent.name == "d"]  # tensorstore chunks
    assert data_files, sorted(p.relative_to(damaged) for p in damaged.rglob("*"))
    for path in data_files:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated, as by a full disk

    config.num_train_steps = 6
    train(config, workdir)
    assert "resumed from step 2" in caplog.text
    assert "checkpoint at step 4 cannot be restored" in caplog.text
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone, logged once


def test_export_hf_logits_match_jax(short_run, tmp_path):
    _, workdir = short_run
    out = tmp_path / "hf"
    assert export_hf.main([f"--workdir={workdir}", f"--out={out}", "--dtype=float32"]) == 0
    model, step = restore_model(workdir)
    assert step == 4
    hf_logits_match(model, out, "Which vitamins are fat-soluble?")
    assert export_hf.main([f"--workdir={workdir}", f"--out={out}", "--step=3"]) == 1  # no such step


def test_bad_config_fails_clearly(prepared, tmp_path):
    config = tiny_config(prepared, num_train_steps=0, num_epochs=0)
    with pytest.raises(ValueError, match="num_train_steps or config.num_epochs"):
        train(config, tmp_path / "a")
    config = tiny_config(prepared)
    config.model.vocab_size = 100
    with pytest.raises(ValueError, match="tokenizer has 512 tokens"):
        train(config, tmp_path / "b")
    config = tiny_config(prepared, grad_accum_steps=3)
    with pytest.raises(ValueError, match="not divisible by grad_accum_steps=3"):
        train(config, tmp_path / "c")
