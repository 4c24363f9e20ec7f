"""Helpers for the human-study tests: output files in `generate`'s format, a served study, its tokens."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[3]
XSS = ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>")


STYLES = ("terse", "thorough", "cautious")  # answer markers; none is part of any model or file name in the tests


def write_outputs(path: Path, generator: str, n: int, *, style: str, xss_every: int = 0) -> Path:
    """`n` answers in `generate`'s format; every `xss_every`-th answer carries script-injection attempts.

    Each answer says "style {style}", so a test can tell from the displayed text which model wrote it (and
    so check that a vote is counted for the model actually shown on that side) without the model's name or
    file name ever being on the page.
    """
    records = []
    for i in range(n):
        answer = (f"Answer {i}, {style_marker(style)}: drink fluids, rest, and see a doctor if the fever lasts "
                  "over 3 days.")
        if xss_every and i % xss_every == 0:
            answer += f" {XSS[0]} and {XSS[1]}"
        instruction = f"Question {i}: what should a patient with a fever of 38.{i % 10} C do?"
        records.append({"id": i, "instruction": instruction,
                        "input": "<noinput>" if i % 2 else f"Patient {i} is {20 + i} years old.",
                        "output": answer, "generator": generator})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


def style_marker(style: str) -> str:
    """The words of an answer that tell its model (the `style` given to `write_outputs`)."""
    return f"style {style}"


@dataclass(frozen=True)
class Tokens:
    admin: str
    raters: list[str]  # in rater order


def tokens(db_path: Path) -> Tokens:
    with sqlite3.connect(db_path) as conn:
        admin = conn.execute("SELECT value FROM meta WHERE key = 'admin_token'").fetchone()[0]
        raters = [t for (t,) in conn.execute("SELECT token FROM raters ORDER BY id")]
    return Tokens(admin, raters)


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


@contextmanager
def served(db_path: Path, *extra: str, command: Sequence[str] = (sys.executable, "-m", "alpacare_jax.eval.human"),
           env: dict | None = None, cwd: Path = REPO_ROOT):
    """`serve` as a real process on a free port (by default `python -m alpacare_jax.eval.human` of this
    checkout); yields its base URL."""
    proc = subprocess.Popen([*command, "serve", "--db", str(db_path), "--port", "0", *extra],
                            env=subprocess_env() if env is None else env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (https?://\S+)/$", line.strip())
        if not match:
            proc.kill()
            raise AssertionError(f"serve did not start: {line}\n{proc.stderr.read()[-3000:]}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def sign_in(client: httpx.Client, token: str) -> httpx.Response:
    """What a browser does with an invite link: open the sign-in page (it sets the form's nonce cookie), post it."""
    page = client.get(f"/login/{token}")
    assert page.status_code == 200, page.text
    return client.post("/login", data={"token": token, "login_nonce": login_nonce(page.text)})


def login_nonce(html: str) -> str:
    return re.search(r'name="login_nonce" value="([^"]+)"', html).group(1)


# Where tests leave screenshots and charts for people to look at (ignored by git; CI can keep it as an artifact).
ARTIFACTS = REPO_ROOT / "test-artifacts" / "human_eval"


def artifacts_dir() -> Path:
    """$HUMAN_EVAL_ARTIFACTS if set, else `test-artifacts/human_eval/` in the checkout."""
    path = Path(os.environ.get("HUMAN_EVAL_ARTIFACTS") or ARTIFACTS)
    path.mkdir(parents=True, exist_ok=True)
    return path
