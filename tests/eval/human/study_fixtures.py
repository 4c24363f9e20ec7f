"""Helpers for the human-study tests: output files in `generate`'s format, a served study, its tokens."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
        answer = f"Answer {i}, {style_marker(style)}: drink fluids, rest, and see a doctor if the fever lasts over 3 days."
        if xss_every and i % xss_every == 0:
            answer += f" {XSS[0]} and {XSS[1]}"
        records.append({"id": i, "instruction": f"Question {i}: what should a patient with a fever of 38.{i % 10} C do?",
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
def served(db_path: Path):
    """`python -m alpacare_jax.eval.human serve` as a real process on a free port; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "alpacare_jax.eval.human", "serve", "--db", str(db_path),
                             "--port", "0"], env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://\S+)/$", line.strip())
        if not match:
            proc.kill()
            raise AssertionError(f"serve did not start: {line}\n{proc.stderr.read()[-3000:]}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def artifacts_dir(default: Path) -> Path:
    """Where tests leave screenshots and charts for people to look at: $HUMAN_EVAL_ARTIFACTS, else `default`."""
    path = Path(os.environ.get("HUMAN_EVAL_ARTIFACTS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path
