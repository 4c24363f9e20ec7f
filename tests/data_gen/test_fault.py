"""Fault test: injected 429s, 500s, timeouts, malformed bodies and two SIGKILLs of the real process.

The run must end with exactly the requested records, no duplicates, and no finished
request billed again: every request the server billed twice was one whose record was not
yet on disk when the process was killed (it was in flight), so billed <= records + those.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter

from tests.data_gen.fake_openai_server import Faults
from tests.data_gen.harness import FAST, cli_env

N = 300
CONCURRENCY = 8


def stored_ids(path) -> list[str]:
    if not path.exists():
        return []
    ids = []
    for line in path.read_bytes().split(b"\n"):
        try:
            ids.append(json.loads(line)["request_id"])
        except (json.JSONDecodeError, KeyError):
            pass  # a partly written last line
    return ids


def test_generation_survives_faults_and_kills(fake_server, tmp_path, seed_tasks):
    seed = int(time.time())
    rng = random.Random(seed)
    server = fake_server(latency=0.01, faults=Faults(p429=0.06, retry_after_ms=30, p500=0.06, ptimeout=0.03,
                                                     timeout_sleep=1.0, pmalformed=0.03, seed=seed))
    tasks = [{"instruction": f"Question {i}: explain {seed_tasks[i % len(seed_tasks)]['instruction']}",
              "input": "<noinput>", "topic": seed_tasks[i % len(seed_tasks)]["topic"], "type": "t", "view": "v",
              "difficulty": "2"} for i in range(N)]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    out = tmp_path / "resp.jsonl"
    cmd = [sys.executable, "-m", "data_gen", "responses", "--in", "tasks.json", "--out", str(out), "--export",
           "medinstruct.json", "--concurrency", str(CONCURRENCY), *FAST, "--timeout", "0.4", "--max_attempts", "20"]
    snapshots = []
    for _ in range(2):
        # Each run is killed after storing 30-100 new records: a target counted from what is already on
        # disk, so a run that overshot its own target cannot leave the next one nothing to do.
        target = len(set(stored_ids(out))) + rng.randrange(30, 100)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(server), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(stored_ids(out)) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        snapshots.append(set(stored_ids(out)))
        assert len(snapshots[-1]) < N, f"seed {seed}: the run finished before it could be killed"
    final = subprocess.run(cmd, cwd=tmp_path, env=cli_env(server), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, f"seed {seed}: {final.stderr[-2000:]}"

    ids = stored_ids(out)
    assert len(ids) == N and len(set(ids)) == N, f"seed {seed}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for r in records:  # each answer belongs to its own question (the server echoes its first words)
        assert r["output"].startswith("Answer: " + " ".join(r["instruction"].split()[:6]))
        assert r["finish_reason"] == "stop" and not r["truncated"]
    exported = json.loads((tmp_path / "medinstruct.json").read_text())
    assert [e["instruction"] for e in exported] == [t["instruction"] for t in tasks]
    assert all(e["topic"] == t["topic"] for e, t in zip(exported, tasks))

    ledger = [e for e in server.ledger if e["status"] == "ok"]
    runs = list(dict.fromkeys(e["run"] for e in server.ledger))  # in order of first request
    assert len(runs) == 3, f"seed {seed}: expected 3 processes, saw {len(runs)}"
    per_run = [Counter(e["request_id"] for e in ledger if e["run"] == run) for run in runs]
    for c in per_run:
        assert max(c.values()) == 1  # within a process nothing is billed twice
    billed = Counter(e["request_id"] for e in ledger)
    rebilled = [rid for rid, n in billed.items() if n > 1]
    for rid in rebilled:
        # billed again only if its record was not on disk when a process died
        first_run = next(k for k, c in enumerate(per_run) if rid in c)
        assert rid not in snapshots[first_run], f"seed {seed}: finished request {rid} was billed again"
    assert sum(billed.values()) <= N + len(rebilled)
    assert sum(billed.values()) - N <= 2 * CONCURRENCY
    st = server.stats()
    assert st["429"] and st["500"] and st["timeout"] and st["malformed"], st
    assert set(billed) == set(ids)
