"""Benchmark: request throughput of data_gen's client layer against a local OpenAI-compatible server
(50 ms latency, 6,000 requests/minute limit enforced with 429s), vs AlpaCare's 5-at-a-time
``asyncio.gather``, measured in the same run.

    python bench/generation_throughput.py [--requests 5000] [--peer-requests 1000]

The server is ``tests/data_gen/fake_openai_server.py`` in its own process. data_gen runs
the requests through the same runner the commands use (rate limiter at 6,000 RPM,
retries, JSONL store). The peer sends batches of 5 concurrent requests and waits for each
batch before the next, with the same openai client (its default 2 retries).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from data_gen.client import ClientConfig  # noqa: E402
from data_gen.runner import Job, RunSettings, run_jobs  # noqa: E402
from data_gen.store import JsonlStore  # noqa: E402

SERVER = ROOT / "tests" / "data_gen" / "fake_openai_server.py"


def body(i: int) -> dict:
    return {"model": "gpt-3.5-turbo", "max_tokens": 256,
            "messages": [{"role": "user", "content": f"Explain medical topic number {i} briefly."}]}


def stats(base: str) -> dict:
    with urllib.request.urlopen(base.replace("/v1", "/_stats")) as r:
        return json.loads(r.read())


def run_ours(base: str, n: int, rpm: float, concurrency: int) -> float:
    jobs = [Job(request_id=f"r{i:06d}", body=body(i)) for i in range(n)]
    settings = RunSettings(client=ClientConfig(base_url=base, api_key="sk-bench", concurrency=concurrency, rpm=rpm,
                                               timeout=30), progress=False)
    with tempfile.TemporaryDirectory() as d, JsonlStore(Path(d) / "out.jsonl") as store:
        t = time.perf_counter()
        summary = run_jobs(jobs, store, lambda job, c: {"request_id": job.request_id, "output": c.content},
                           settings)
        elapsed = time.perf_counter() - t
        assert len(store) == n and summary.failed == 0, summary.line()
    return elapsed


async def run_alpacare(base: str, n: int) -> float:
    client = openai.AsyncOpenAI(base_url=base, api_key="sk-bench")
    t = time.perf_counter()
    for start in range(0, n, 5):  # AlpaCare: gather 5 requests, wait for all, repeat
        await asyncio.gather(*[client.chat.completions.create(**body(i)) for i in range(start, min(n, start + 5))])
    elapsed = time.perf_counter() - t
    await client.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--peer-requests", type=int, default=1000)
    ap.add_argument("--rpm", type=float, default=6000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()

    server = subprocess.Popen([sys.executable, str(SERVER), "--latency", str(args.latency), "--rpm", str(args.rpm),
                               "--lifetime", "900"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        base = f"http://127.0.0.1:{port}/v1"
        s0 = stats(base)
        ours = run_ours(base, args.requests, args.rpm, args.concurrency)
        s1 = stats(base)
        peer = asyncio.run(run_alpacare(base, args.peer_requests))
        s2 = stats(base)
    finally:
        server.kill()
        server.wait()
    ours_rpm = args.requests / ours * 60
    peer_rpm = args.peer_requests / peer * 60
    print(f"server: {args.latency * 1000:.0f} ms latency, limit {args.rpm:.0f} RPM")
    print(f"data_gen:  {args.requests} requests in {ours:.1f} s = {ours_rpm:,.0f} RPM "
          f"({100 * ours_rpm / args.rpm:.1f}% of the limit), "
          f"{s1.get('429-rpm', 0) - s0.get('429-rpm', 0)} server 429s")
    print(f"AlpaCare 5-at-a-time gather: {args.peer_requests} requests in {peer:.1f} s = {peer_rpm:,.0f} RPM "
          f"({100 * peer_rpm / args.rpm:.1f}% of the limit), {s2.get('429-rpm', 0) - s1.get('429-rpm', 0)} server 429s")
    print(f"ratio data_gen / AlpaCare: {ours_rpm / peer_rpm:.2f}x; target >= 90% of the limit: "
          f"{'met' if ours_rpm >= 0.9 * args.rpm else 'MISSED'}")


if __name__ == "__main__":
    main()
