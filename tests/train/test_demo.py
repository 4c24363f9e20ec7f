"""The README's main job: configs/demo.py trains, the loss halves, the HF export matches."""

from __future__ import annotations

import logging

from alpacare_jax.train.loop import train
from alpacare_jax.train.metrics import read_metrics
from tests.train.harness import demo_config, hf_logits_match, restore_model


def test_demo_loss_halves_and_export_matches(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="alpacare_jax")
    config = demo_config()  # as the README runs it, first-run bootstrap of tokenizer and dataset included
    config.eval_every = 0
    workdir = tmp_path / "demo"
    train(config, workdir)

    losses = [r["loss"] for r in read_metrics(workdir)]
    assert losses[-1] <= 0.5 * losses[0], losses
    assert "exported the model for transformers" in caplog.text and "### Response:\n" in caplog.text
    model, step = restore_model(workdir)
    assert step == config.num_train_steps
    hf_logits_match(model, workdir / "hf", config.sample_prompt)
