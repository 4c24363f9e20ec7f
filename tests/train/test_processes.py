"""Real training subprocesses: SIGKILL + restart resumes exactly, SIGTERM checkpoints, 2 hosts == 1 host.

Each test starts `python -m alpacare_jax.train` processes (bounded by timeouts) with their own fake CPU
devices; under pytest-xdist these run beside the in-process tests.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from alpacare_jax import sharding
from alpacare_jax.data import pipeline
from alpacare_jax.data.tokenizer import load_tokenizer
from alpacare_jax.train import optimizer
from alpacare_jax.train import state as state_lib
from alpacare_jax.train import step as step_lib
from alpacare_jax.train.config import llama_config
from alpacare_jax.train.loop import train
from alpacare_jax.train.metrics import read_metrics
from tests.train.harness import free_port, run_train, subprocess_env, tiny_config, train_command

pytestmark = pytest.mark.slow


def _committed_steps(workdir: Path) -> list[int]:
    """Steps orbax has finalised (uncommitted saves live under temporary names)."""
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _wait_for(condition, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def test_sigkill_then_restart_matches_uninterrupted_run(prepared, tmp_path):
    n = 3
    config = tiny_config(prepared, num_train_steps=4 * n, checkpoint_every=1, keep_checkpoints=2)
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
    expected, got = _losses(reference), _losses(killed)
    assert sorted(got) == list(range(1, 4 * n + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6, atol=0)


def test_sigterm_checkpoints_current_step_and_exits_0(prepared, tmp_path):
    config = tiny_config(prepared, num_train_steps=10_000, checkpoint_every=10_000)
    workdir = tmp_path / "run"
    proc = subprocess.Popen(train_command(config, workdir), env=subprocess_env(8), cwd=Path(__file__).parents[2],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = workdir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc, 180, "3 steps")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    saved = _committed_steps(workdir)
    last_logged = max(_losses(workdir))
    assert len(saved) == 1 and 3 <= saved[0] < 10_000
    assert saved[0] >= last_logged
    assert f"preempted: saved a checkpoint at step {saved[0]}" in err  # a warning: stderr


def test_two_processes_match_one_process(prepared, tmp_path):
    """2 processes x 4 devices (jax.distributed on localhost) == 1 process x 8 devices, 3 steps."""
    steps = 3
    config = tiny_config(prepared, num_train_steps=steps)
    workdir = tmp_path / "two"
    port = free_port()
    procs = [
        subprocess.Popen(
            train_command(config, workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                          f"--process_id={i}"),
            env=subprocess_env(4), cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        for i in range(2)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            proc.kill()
    two_process_losses = [_losses(workdir)[s] for s in range(1, steps + 1)]

    # One process, 8 devices, fed the same global batches: process p's rows are its shard of the split,
    # so concatenate what each process's pipeline yields.
    tokenizer = load_tokenizer(config.tokenizer)
    iterators = [pipeline.make_train_iterator(config.data, tokenizer, process_index=p, process_count=2)
                 for p in range(2)]
    model_config = llama_config(config)
    tx, schedule = optimizer.make_optimizer(config.optimizer, steps)
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=-1), jax.devices())
    setup = state_lib.make_setup(model_config, tx, mesh, sharding.DEFAULT_RULES)
    state = state_lib.init_train_state(setup, model_config, tx, config.seed)
    train_step = step_lib.jit_train_step(setup, tx, schedule)
    one_process_losses = []
    for _ in range(steps):
        local = [next(it) for it in iterators]
        batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
        state, metrics = train_step(state, pipeline.to_global_batch(batch, mesh, sharding.batch_sharding(mesh).spec))
        one_process_losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(two_process_losses, one_process_losses, rtol=1e-5)
