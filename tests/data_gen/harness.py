"""Helpers shared by the data_gen tests: run the real CLI as a subprocess against the local fake server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.data_gen.fake_openai_server import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
TEST_KEY = "sk-test-DO-NOT-LEAK-7f3a9c"
FAST = ["--backoff_base", "0.02", "--timeout", "5", "--no_progress"]


def cli_env(server: FakeOpenAI, key: str = TEST_KEY) -> dict:
    env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=key,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OPENAI_LOG", None)
    return env


def run_cli(args: list[str], server: FakeOpenAI, cwd: Path, timeout: float = 120, key: str = TEST_KEY
            ) -> subprocess.CompletedProcess:
    """Run ``python -m data_gen ARGS`` as a real subprocess against ``server``."""
    return subprocess.run([sys.executable, "-m", "data_gen", *args], env=cli_env(server, key), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def read_summary(folder: Path, model: str, reference: str, test_set: str) -> dict:
    """The one win-rate summary of (model, reference, test set) in ``folder`` (its name ends in the comparison's id)."""
    [path] = folder.glob(f"winrate__{model}__vs__{reference}__{test_set}__*.json")
    return json.loads(path.read_text())


def kill_while_batch_runs(args: list[str], server: FakeOpenAI, cwd: Path, state: Path) -> None:
    """Start ``python -m data_gen ARGS`` (Batch API) and SIGKILL it between its batch's submission and completion.

    ``server`` holds its batches (``hold_batches=True``), so the batch cannot complete before the kill; the
    process is killed once the batch state file exists (the batch is submitted and recorded) and the process
    has polled the batch since it started (it is waiting for it, past any submission).
    """
    polls = sum(server.batch_polls.values())
    proc = subprocess.Popen([sys.executable, "-m", "data_gen", *args], cwd=cwd, env=cli_env(server),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (state.exists() and sum(server.batch_polls.values()) > polls):
        assert proc.poll() is None, f"the command exited ({proc.returncode}) before waiting for a batch"
        assert time.monotonic() < deadline, "no batch submitted and polled within 60 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not ended by itself
    assert all(b["status"] in ("validating", "in_progress") and not b["output_file_id"]
               for b in server.batches.values())  # submitted, not completed


def rerun_polling_the_held_batch(args: list[str], server: FakeOpenAI, cwd: Path) -> subprocess.CompletedProcess:
    """Rerun the command while the batch a killed run submitted is still running; release the batch only once
    the rerun has polled it (so the rerun resumed the unfinished batch instead of submitting another)."""
    [batch_id] = server.batches
    before = server.batch_polls.get(batch_id, 0)
    proc = subprocess.Popen([sys.executable, "-m", "data_gen", *args], cwd=cwd, env=cli_env(server),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while server.batch_polls.get(batch_id, 0) == before:
        assert proc.poll() is None, f"the rerun exited ({proc.returncode}) without polling the batch"
        assert time.monotonic() < deadline, "the rerun did not poll the batch within 60 s"
        time.sleep(0.02)
    server.release_batches()
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
