"""The README's main job, shortened: configs/demo.py trains, the loss halves, the HF export matches."""

from __future__ import annotations

from alpacare_jax.train.loop import train
from alpacare_jax.train.metrics import read_metrics
from tests.train.conftest import demo_config, hf_logits_match, restore_model


def test_demo_loss_halves_and_export_matches(prepared, tmp_path, capfd):
    config = demo_config()
    config.num_train_steps = 180  # the full demo runs 300
    config.eval_every = 0
    # Reuse the session's tokenizer and dataset (the bootstrap that builds them is what `prepared` ran).
    config.tokenizer = str(prepared / "tokenizer")
    config.data.data_dir = str(prepared / "tfds")
    workdir = tmp_path / "demo"
    train(config, workdir)

    losses = [r["loss"] for r in read_metrics(workdir)]
    assert losses[-1] <= 0.5 * losses[0], losses
    out = capfd.readouterr().out
    assert "exported the model for transformers" in out and "### Response:\n" in out
    model, step = restore_model(workdir)
    assert step == 180
    hf_logits_match(model, workdir / "hf", config.sample_prompt)
