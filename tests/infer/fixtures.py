"""A trained demo model (workdir + its HF export) and helpers for the generate / evaluate / serve tests.

The model is the trainer tests' tiny demo config trained for a few steps on the session's prepared
sample (tests/conftest.py): its answers are gibberish, but every path from a real checkpoint to
a judged table runs. Tests using it share one xdist group, so one worker trains it, once: each test
module that imports these fixtures gets its own copy of them from pytest, so the workdir lives at a
fixed place in the session's temporary directory and is reused once complete. The command-line tools
run as real subprocesses on one CPU device.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.harness import REPO_ROOT, subprocess_env, tiny_config

GROUP = pytest.mark.xdist_group("trained_demo_model")
MODEL_NAME = "demo"


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory) -> Path:
    """A training workdir (named MODEL_NAME) with checkpoints, tokenizer/ and the HF export in hf/."""
    from alpacare_jax.train.loop import train

    workdir = tmp_path_factory.getbasetemp() / "trained" / MODEL_NAME
    done = workdir.parent / "complete"
    if not done.exists():
        train(tiny_config(prepared, num_train_steps=2, export_hf=True), workdir)
        done.touch()
    return workdir


@pytest.fixture(scope="session")
def test_sets_dir(alpacare_data, tmp_path_factory) -> Path:
    """A TFDS data dir with the medinstruct_test and icliniq test sets built from the release files."""
    from alpacare_jax.data.build import build_dataset

    data_dir = tmp_path_factory.mktemp("test_sets")
    for config in ("medinstruct_test", "icliniq"):
        build_dataset(config, alpacare_data, data_dir)
    return data_dir


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` on one CPU device; fails the test with its stderr if it fails."""
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env or subprocess_env(1), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{module} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc
