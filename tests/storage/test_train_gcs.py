"""Training with its workdir and data at gs:// (the emulator): killed with SIGKILL, restarted, and held to an
uninterrupted local run of the same config. Checkpoints go through orbax's tensorstore, the data through
array_record, metrics.jsonl and the workdir files through epath/gcsfs, TensorBoard through its own client.
"""

from __future__ import annotations

import signal
import subprocess
import time

import gcsfs
import numpy as np
import pytest

from alpacare_jax.train.loop import train
from alpacare_jax.train.metrics import read_metrics
from alpacare_jax.workdir import Workdir
from tests.train.harness import REPO_ROOT, subprocess_env, tiny_config, train_command

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gcs_training")]

STEPS = 12


def _committed_steps(fs: gcsfs.GCSFileSystem, checkpoints: str) -> list[int]:
    """Steps orbax has finished writing: on Cloud Storage it marks each with a commit file (no rename)."""
    if not fs.exists(checkpoints):
        return []
    steps = [int(p.rsplit("/", 1)[1]) for p in fs.ls(checkpoints, refresh=True) if p.rsplit("/", 1)[1].isdigit()]
    return sorted(s for s in steps if fs.exists(f"{checkpoints}/{s}/commit_success.txt"))


def test_killed_run_at_gs_resumes_with_the_losses_of_a_local_run(prepared, gcs_emulator, gcs_bucket, tmp_path):
    config = tiny_config(prepared, num_train_steps=STEPS, checkpoint_every=2, keep_checkpoints=2)
    reference = tmp_path / "reference"
    train(config, reference)  # local and uninterrupted, in this process (the same 8-device mesh)

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.put(str(prepared / "tfds"), f"{gcs_bucket}/tfds", recursive=True)
    config.data.data_dir = f"{gcs_bucket}/tfds"
    workdir = f"{gcs_bucket}/run"
    checkpoints = str(Workdir(workdir).checkpoints_dir).removeprefix("gs://")
    env = {**subprocess_env(8), **gcs_emulator.env()}

    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(train_command(config, workdir), env=env, cwd=REPO_ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not any(s >= 4 for s in _committed_steps(fs, checkpoints)):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "timed out waiting for the step-4 checkpoint"
                time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
    committed = _committed_steps(fs, checkpoints)
    assert committed and committed[-1] < STEPS, f"checkpoints {committed}: the run was not killed mid-way"

    restarted = subprocess.run(train_command(config, workdir), env=env, cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"resumed from step {committed[-1]}" in restarted.stdout

    expected = {r["step"]: r["loss"] for r in read_metrics(reference)}
    got = {r["step"]: r["loss"] for r in read_metrics(workdir)}
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6, atol=0)
    run = Workdir(workdir)
    assert run.model_config() == Workdir(reference).model_config()
    assert run.tokenizer().vocab_size == Workdir(reference).tokenizer().vocab_size
    assert fs.glob(str(run.tensorboard_dir).removeprefix("gs://") + "/events.out.tfevents.*")
