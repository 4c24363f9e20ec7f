"""Harness tasks scored while training: `python -m alpacare_jax.eval train` logs them beside eval_loss, with
the model of that step; the plain training command refuses a config that names them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.eval.fixtures import write_local_data
from tests.train.harness import DEMO_CONFIG, REPO_ROOT, cli_overrides, subprocess_env, tiny_config

TASKS = ["pubmedqa", "wikitext"]  # an accuracy and a perplexity, which moves with every update


@pytest.mark.slow  # a training subprocess
def test_harness_scores_beside_eval_loss(prepared, tmp_path):
    from alpacare_jax import sharding
    from alpacare_jax.eval.scoring import score_tasks
    from alpacare_jax.infer.loading import load_model
    from alpacare_jax.train.loop import train

    data_dir = write_local_data(tmp_path / "data", TASKS, n=3)
    config = tiny_config(prepared, eval_every=2, **{"harness.tasks": ",".join(TASKS), "harness.every": 2,
                                                    "harness.limit": 3, "harness.data_dir": str(data_dir),
                                                    "harness.batch_size": 4})
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match=r"tasks=.pubmedqa,wikitext. needs .*python -m alpacare_jax.eval train"):
        train(config, refused)
    assert not refused.exists()  # refused before anything is written

    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "alpacare_jax.eval", "train", f"--config={DEMO_CONFIG}",
                           f"--workdir={workdir}", *cli_overrides(config)], env=subprocess_env(4), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "pubmedqa/acc" in r}
    assert sorted(scored) == [2, 4], records
    assert all({"eval_loss", "wikitext/word_perplexity"} <= set(r) for r in scored.values()), records
    assert scored[2]["wikitext/word_perplexity"] != scored[4]["wikitext/word_perplexity"]  # the live weights

    # The last scores are the trained model's: the checkpoint of step 4, scored here, gives the same.
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1))
    loaded = load_model(workdir, mesh=mesh)
    assert loaded.step == 4
    expected = score_tasks(loaded.model, loaded.tokenizer, TASKS, limit=3, mesh=mesh, data_dir=data_dir)
    assert {k: scored[4][k] for k in expected} == pytest.approx(expected, rel=1e-5)
