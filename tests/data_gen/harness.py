"""Helpers shared by the data_gen tests: run the real CLI as a subprocess against the local fake server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.data_gen.fake_openai_server import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
TEST_KEY = "sk-test-DO-NOT-LEAK-7f3a9c"
FAST = ["--backoff-base", "0.02", "--timeout", "5", "--no-progress"]


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
