"""The checkpoint fault matrix: a run killed with SIGKILL, its files damaged, then restarted for real.

Every case starts from a copy of the same killed run and is held to an uninterrupted run of the same
config: the restarted run's losses equal the uninterrupted ones at every step (those kept from before
the kill and those computed after the restore), so neither the weights nor the data order changed, or
the run stops with a one-line message and leaves what is on disk alone.

| case                        | expected                                                      |
|-----------------------------|---------------------------------------------------------------|
| truncated newest            | newest set aside, resume from the previous checkpoint         |
| garbled newest (same size)  | checksum mismatch: newest set aside, resume from the previous |
| one flipped bit in newest   | checksum mismatch: newest set aside, resume from the previous |
| every kept step damaged     | exit 1 with one line; checkpoints and metrics left untouched  |
| half-written metrics line   | line dropped with a warning, resume from the newest           |
| newest without checksums    | an older format: restored with a warning, resume from it      |
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from alpacare_jax.train.loop import train
from alpacare_jax.train.metrics import read_metrics
from tests.train.harness import REPO_ROOT, subprocess_env, tiny_config, train_command
from tests.train.test_processes import _committed_steps, _losses, _wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("checkpoint_faults")]

STEPS = 12


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """(config, reference workdir, killed workdir): the killed run holds two checkpoints, the newest >= 6."""
    config = tiny_config(prepared, num_train_steps=STEPS, checkpoint_every=2, keep_checkpoints=2)
    root = tmp_path_factory.mktemp("faults")
    reference = root / "reference"
    train(config, reference)  # uninterrupted, in this process (same 8-device mesh as the subprocesses)

    killed = root / "killed"
    proc = subprocess.Popen(train_command(config, killed), env=subprocess_env(8), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Killed once the step-6 checkpoint is in and the oldest one's removal (keep_checkpoints=2) is over:
        # a kill during that removal leaves a half-deleted step, which these tests do not mean to damage.
        _wait_for(lambda: (steps := _committed_steps(killed)) and 6 in steps and len(steps) == 2, proc, 180,
                  "the step-6 checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    steps = _committed_steps(killed)
    assert len(steps) >= 2 and steps[-1] < STEPS, f"kept checkpoints {steps}: the run was not killed mid-way"
    return config, reference, killed


def _restart(config, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(config, workdir), env=subprocess_env(8), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=240)


def _parameter_data_file(workdir: Path, step: int) -> Path:
    """The largest tensorstore chunk file of the step's weights: where the parameter bytes are."""
    params = workdir / "checkpoints" / str(step) / "params"
    files = [p for p in params.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as by a full disk


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start:start + 4096] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(data))


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _assert_matches_reference(workdir: Path, reference: Path) -> None:
    expected, got = _losses(reference), _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(np.isfinite(list(got.values())))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-6, atol=0)


@pytest.mark.parametrize("damage", [_truncate, _garble, _flip_bit], ids=["truncated", "garbled", "flipped_bit"])
def test_damaged_newest_falls_back_to_previous(runs, tmp_path, damage):
    config, reference, killed = runs
    workdir = tmp_path / "run"
    shutil.copytree(killed, workdir)
    *_, previous, newest = _committed_steps(workdir)
    damage(_parameter_data_file(workdir, newest))

    proc = _restart(config, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {previous}" in proc.stdout
    reports = [line for line in proc.stderr.splitlines() if f"checkpoint at step {newest} cannot be restored" in line]
    assert reports, proc.stderr[-3000:]
    if damage is _flip_bit:  # every byte is still readable: only the checksums can tell
        assert "ChecksumMismatch" in reports[0], reports
    assert [p.name.split(".")[0] for p in (workdir / "checkpoints").glob("*.damaged-*")] == [str(newest)]
    _assert_matches_reference(workdir, reference)


def test_every_checkpoint_damaged_stops_and_keeps_everything(runs, tmp_path):
    config, _, killed = runs
    workdir = tmp_path / "run"
    shutil.copytree(killed, workdir)
    steps = _committed_steps(workdir)
    for step in steps:
        _truncate(_parameter_data_file(workdir, step))
    metrics_before = (workdir / "metrics.jsonl").read_bytes()

    proc = _restart(config, workdir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "no checkpoint can be restored" in last_line, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert _committed_steps(workdir) == steps  # left in place for a person to decide
    assert (workdir / "metrics.jsonl").read_bytes() == metrics_before


def test_half_written_metrics_line_is_dropped(runs, tmp_path):
    config, reference, killed = runs
    workdir = tmp_path / "run"
    shutil.copytree(killed, workdir)
    newest = _committed_steps(workdir)[-1]
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write(f'{{"step": {newest + 1}, "loss": 1.23')  # a write cut short by the kill

    proc = _restart(config, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {newest}" in proc.stdout
    assert "dropped a half-written last line" in proc.stderr
    _assert_matches_reference(workdir, reference)
    assert len(read_metrics(workdir)) == STEPS


def test_checkpoint_of_the_older_format_without_checksums_restores_with_a_warning(runs, tmp_path):
    config, reference, killed = runs
    workdir = tmp_path / "run"
    shutil.copytree(killed, workdir)
    newest = _committed_steps(workdir)[-1]
    shutil.rmtree(workdir / "checkpoints" / str(newest) / "checksums")  # as written before checksums existed

    proc = _restart(config, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {newest}" in proc.stdout
    assert f"checkpoint at step {newest} has no checksums" in proc.stderr
    _assert_matches_reference(workdir, reference)
