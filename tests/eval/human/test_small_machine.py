"""A study server on a small machine: the documented install (data_gen and the app's requirements file,
then this project without its dependencies: no JAX stack) in a fresh virtual environment runs `create`,
`serve` and `results`."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tomllib

from tests.eval.human.study_fixtures import REPO_ROOT, STYLES, served, sign_in, write_outputs

REQUIREMENTS = REPO_ROOT / "alpacare_jax" / "eval" / "human" / "requirements.txt"
# Nothing of this checkout or of this machine's environment may reach the new one through the import path.
BARE_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "tensorflow_datasets", "grain", "torch", "transformers")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~; \[]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_requirements_file_is_the_human_extra():
    listed = [line for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["human"]
    assert sorted(listed) == sorted(extra)
    # Each is a distribution this environment has (a typo would pass unnoticed in the extra).
    for name in _names(listed):
        importlib.metadata.distribution(name)


def _run(*command, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, env=BARE_ENV, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command[:3]} exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_documented_install_runs_a_study_without_jax(tmp_path):
    # A copy of what a checkout holds for packaging (a build writes into its source directory).
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, checkout / name)
    for package in ("alpacare_jax", "data_gen"):
        shutil.copytree(REPO_ROOT / package, checkout / package, ignore=shutil.ignore_patterns("__pycache__"))

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]  # .pyc files: written on use
    _run(*pip, "./data_gen", "-r", str(REQUIREMENTS.relative_to(REPO_ROOT)), cwd=checkout)  # the README's commands
    _run(*pip, "--no-deps", ".", cwd=checkout)
    probe = "import importlib.util as u, json, sys; print(json.dumps([m for m in sys.argv[1:] if u.find_spec(m)]))"
    present = json.loads(_run(str(venv / "bin" / "python"), "-c", probe, *HEAVY, cwd=tmp_path).stdout)
    assert present == [], f"the environment has {present}"

    work = tmp_path / "work"
    files = [write_outputs(work / f"{m}.json", m, 6, style=s) for m, s in zip(("small-a", "small-b"), STYLES)]
    command = [str(venv / "bin" / "alpacare-human-eval")]
    created = _run(*command, "create", "--outputs", *map(str, files), "--raters", "1", "--db", "study.sqlite", cwd=work)
    token = created.stdout.split("rater-1: ", 1)[1].split()[0].rsplit("/", 1)[1]
    with served(work / "study.sqlite", command=command, env=BARE_ENV, cwd=work) as url:
        client = httpx.Client(base_url=url, timeout=60)
        assert sign_in(client, token).status_code == 303
        page = client.get("/rate", follow_redirects=True)
        csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text).group(1)
        vote = client.post(page.url.path, data={"correctness": "A", "helpfulness": "tie", "csrf_token": csrf})
        assert vote.status_code == 303
    results = _run(*command, "results", "--db", "study.sqlite", "--out", "results", cwd=work)
    assert "small-a vs small-b" in results.stdout
    exported = json.loads((work / "results" / "results.json").read_text())
    assert len(exported["votes"]) == 1 and exported["progress"] == [{"rater": "rater-1", "done": 1, "total": 6}]
    assert (work / "results" / "chart.png").read_bytes().startswith(b"\x89PNG")
