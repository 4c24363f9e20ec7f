"""Fixtures for data_gen tests: a real local OpenAI-compatible server and the AlpaCare release files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # fake_openai_server
sys.path.insert(0, str(REPO))  # data_gen

from fake_openai_server import FakeOpenAI, Faults  # noqa: E402

ALPACARE = REPO / ".." / "shared" / "alpacare_data"
TEST_KEY = "sk-test-DO-NOT-LEAK-7f3a9c"


@pytest.fixture
def alpacare_data() -> Path:
    if not (ALPACARE / "med_seed.json").exists():
        pytest.skip("AlpaCare release files not found at ../shared/alpacare_data")
    return ALPACARE


@pytest.fixture
def seed_tasks(alpacare_data) -> list[dict]:
    return json.loads((alpacare_data / "med_seed.json").read_text())


@pytest.fixture
def fake_server():
    """Factory: ``fake_server(latency=..., faults=Faults(...))`` -> a started server, stopped after the test."""
    servers = []

    def make(**kw) -> FakeOpenAI:
        kw.setdefault("lifetime", 170.0)  # stops by itself even if a test hangs
        s = FakeOpenAI(**kw)
        s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def cli_env(server: FakeOpenAI, key: str = TEST_KEY) -> dict:
    env = dict(os.environ, OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=key,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OPENAI_LOG", None)
    return env


FAST = ["--backoff-base", "0.02", "--timeout", "5", "--no-progress"]


def run_cli(args: list[str], server: FakeOpenAI, cwd: Path, timeout: float = 120, key: str = TEST_KEY
            ) -> subprocess.CompletedProcess:
    """Run ``python -m data_gen ARGS`` as a real subprocess against ``server``."""
    return subprocess.run([sys.executable, "-m", "data_gen", *args], env=cli_env(server, key), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


__all__ = ["FakeOpenAI", "Faults", "run_cli", "cli_env", "FAST", "TEST_KEY", "REPO"]
