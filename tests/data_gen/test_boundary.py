"""data_gen's boundary: one public API (the one alpacare_jax uses), a standalone import, one flag spelling (the
old dashed one still accepted), and the HTTP transport family kept out of every command's log."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest

import data_gen
from data_gen.__main__ import COMMANDS, build_parser, main
from data_gen.cli import underscore_flags
from tests.data_gen.harness import REPO, cli_env


def test_alpacare_jax_uses_only_the_public_api():
    assert all(hasattr(data_gen, name) for name in data_gen.__all__)
    found = []
    for path in sorted((REPO / "alpacare_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "data_gen":
                if node.module != "data_gen":
                    found.append(f"{path.relative_to(REPO)}: from {node.module} import ...")
                found += [f"{path.relative_to(REPO)}: {a.name} is not public" for a in node.names
                          if a.name not in data_gen.__all__]
            elif isinstance(node, ast.Import):
                found += [f"{path.relative_to(REPO)}: import {a.name}" for a in node.names
                          if a.name.startswith("data_gen")]
    assert found == []


def test_data_gen_imports_without_alpacare_jax_or_jax():
    code = ("import sys, data_gen, data_gen.__main__; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'alpacare_jax', 'jax', 'flax'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


def test_flags_are_spelled_with_underscores_and_the_old_dashes_still_work(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        dashed = re.findall(r"--[a-z0-9]+-[a-z0-9-]+", capsys.readouterr().out)
        assert dashed == [], (command, dashed)  # the dashed aliases stay unlisted
    assert underscore_flags(["judge", "--max-cost=1.5", "--batch-api", "--rule", "keep-first", "-v", "--",
                             "--a-file"]) == ["judge", "--max_cost=1.5", "--batch_api", "--rule", "keep-first", "-v",
                                              "--", "--a-file"]
    old = build_parser().parse_args(underscore_flags(["responses", "--in", "t.json", "--out", "o.jsonl",
                                                      "--max-tokens-cap", "64", "--no-progress", "--base-url", "u"]))
    new = build_parser().parse_args(["responses", "--in", "t.json", "--out", "o.jsonl", "--max_tokens_cap", "64",
                                     "--no_progress", "--base_url", "u"])
    assert old == new and new.max_tokens_cap == 64 and new.no_progress and new.base_url == "u"


@pytest.mark.parametrize("setup", [
    "import logging; from data_gen import silence_transport_logs; logging.basicConfig(level=logging.DEBUG); "
    "silence_transport_logs()",
    "from alpacare_jax.infer.cli import setup_logging; setup_logging()",  # generate, serve, the judge table
], ids=["data_gen", "alpacare_jax"])
def test_the_whole_transport_family_stays_out_of_the_log(setup):
    code = setup + """
import logging
logging.getLogger().setLevel(logging.DEBUG)  # the transport's records must be dropped by name, not by level
for name in ("openai._base_client", "httpx", "httpx2._client", "httpcore.http11", "httpcore2.connection", "h11", "h2"):
    logging.getLogger(name).info("TRANSPORT %s", name)
logging.getLogger("httpcore2.connection").warning("A TRANSPORT WARNING")
logging.getLogger("alpacare_jax.infer").info("OWN LINE")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OWN LINE" in out.stderr and "A TRANSPORT WARNING" in out.stderr
    assert "TRANSPORT " not in out.stderr.replace("A TRANSPORT WARNING", ""), out.stderr


def test_the_readme_python_example_runs(fake_server, tmp_path, alpacare_data, monkeypatch):
    text = (REPO / "data_gen" / "README.md").read_text(encoding="utf-8")
    [code] = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    lines = (alpacare_data / "reference_outputs" / "gpt-4" / "medsi_output.jsonl").read_text().splitlines()[:5]
    (tmp_path / "gpt-4").mkdir()
    (tmp_path / "gpt-4" / "medsi_output.jsonl").write_text("".join(line + "\n" for line in lines))
    rows = [json.loads(line) for line in lines]
    (tmp_path / "outputs.json").write_text(json.dumps([{"instruction": r["instruction"], "input": r["input"],
                                                        "output": r["output"] + " More.", "generator": "m"}
                                                       for r in rows]))
    server = fake_server()
    monkeypatch.chdir(tmp_path)
    for key, value in cli_env(server).items():
        monkeypatch.setenv(key, value)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example, as a user runs it
    assert scope["wr"].win_rate == scope["result"].summaries[0].win_rate == 100.0
    assert server.stats()["billed"] == 2 * len(rows)
