"""The client layer against the real local server: retries, Retry-After, timeouts, budget, rate limit, keys."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from data_gen.accounting import CostMeter, Price
from data_gen.client import ClientConfig, LLMClient, RequestFailed
from data_gen.errors import BudgetExceeded, FatalAPIError
from data_gen.store import JsonlStore
from tests.data_gen.fake_openai_server import Faults
from tests.data_gen.harness import FAST, TEST_KEY, run_cli

BODY = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "What is anemia?"}], "max_tokens": 200}


def chat(server, n=1, **cfg):
    cfg = {"base_url": server.base_url, "api_key": TEST_KEY, "backoff_base": 0.02, "timeout": 5, **cfg}
    meter = cfg.pop("meter", None)

    async def go():
        client = LLMClient(ClientConfig(**cfg), meter)
        try:
            return await asyncio.gather(*[client.chat(f"r{i}", BODY) for i in range(n)], return_exceptions=True), client
        finally:
            await client.close()
    return asyncio.run(go())


def test_usage_and_finish_reason(fake_server):
    server = fake_server()
    (c,), client = chat(server)
    assert c.finish_reason == "stop" and c.completion_tokens == len(c.content.split()) > 0
    assert c.prompt_tokens == 3 and c.attempts == 1
    assert client.meter.billed_requests == 1 and client.meter.spent == pytest.approx(c.cost) and c.cost > 0


def test_retry_after_ms_is_honoured(fake_server):
    server = fake_server(faults=Faults(p429=1.0, retry_after_ms=300))
    t = time.monotonic()
    (err,), _ = chat(server, max_attempts=3)
    elapsed = time.monotonic() - t
    assert isinstance(err, RequestFailed) and "RateLimitError after 3" in str(err)
    assert elapsed >= 0.6  # two waits of >= 300 ms, though the backoff base is 20 ms
    assert server.stats()["429"] == 3 and server.stats()["billed"] == 0


def test_500_timeout_malformed_are_retried(fake_server):
    server = fake_server(faults=Faults(p500=0.2, ptimeout=0.1, pmalformed=0.2, timeout_sleep=1.0, seed=4))
    results, client = chat(server, n=30, timeout=0.3, max_attempts=10)
    assert all(not isinstance(r, Exception) for r in results), results
    st = server.stats()
    assert st["500"] > 0 and st["timeout"] > 0 and st["malformed"] > 0
    assert st["billed"] == 30 and client.meter.billed_requests == 30
    assert client.meter.retries == st["500"] + st["timeout"] + st["malformed"]


def test_retry_wait_is_bounded(fake_server):
    server = fake_server(faults=Faults(p429=1.0, retry_after_ms=400))
    t = time.monotonic()
    (err,), _ = chat(server, max_attempts=100, max_total_wait=1.0)
    assert isinstance(err, RequestFailed) and "wait budget" in str(err)
    assert time.monotonic() - t < 3


def test_bad_key_is_fatal_and_never_shown(fake_server):
    server = fake_server(require_key="sk-the-right-one")
    (err,), _ = chat(server, api_key="sk-wrong-SECRET-123")
    assert isinstance(err, FatalAPIError) and "SECRET" not in str(err)
    assert "sk-wrong-SECRET-123" not in repr(ClientConfig(api_key="sk-wrong-SECRET-123"))


def test_budget_stops_before_sending(fake_server):
    server = fake_server()
    meter = CostMeter(max_cost=0.0005, price_override=Price(1000.0, 1000.0))  # about 1 request's worst case
    results, _ = chat(server, n=5, meter=meter, concurrency=1)
    assert any(isinstance(r, BudgetExceeded) for r in results)
    assert server.stats()["billed"] == sum(not isinstance(r, Exception) for r in results) < 5
    assert meter.spent <= 0.0005


def test_rate_limit_paces_requests(fake_server):
    server = fake_server(rpm=600)  # the server answers 429 above 10/s
    t = time.monotonic()
    results, _ = chat(server, n=25, rpm=600)
    elapsed = time.monotonic() - t
    assert all(not isinstance(r, Exception) for r in results)
    assert elapsed >= 2.0  # 25 requests at 10/s with a burst of 1
    assert server.stats().get("429-rpm", 0) <= 2


def test_store_repairs_partial_tail_and_rejects_duplicates(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"request_id": "a", "x": 1}) + "\n" + '{"request_id": "b", "x"')
    s = JsonlStore(p)
    assert list(s.records) == ["a"]
    s.append({"request_id": "b", "x": 2})
    s.close()
    assert [json.loads(line)["request_id"] for line in p.read_text().splitlines()] == ["a", "b"]
    p.write_text(json.dumps({"request_id": "a"}) + "\n" + json.dumps({"request_id": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"s.jsonl, record 1, field 'request_id': duplicate"):
        JsonlStore(p)


def test_api_key_never_logged_or_written(fake_server, tmp_path, seed_tasks, alpacare_data):
    server = fake_server(faults=Faults(p429=0.2, p500=0.2, seed=2))
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"instruction": t["instruction"], "input": t["input"]} for t in seed_tasks[:10]]))
    outs = []
    for args in (["instructions", "--seeds", str(alpacare_data / "med_seed.json"), "--out", "raw.jsonl",
                  "--num_requests", "5", "--tasks_per_request", "3"],
                 ["responses", "--in", str(tasks), "--out", "resp.jsonl", "--export", "resp.json"],
                 ["responses", "--in", str(tasks), "--out", "resp2.jsonl", "--batch_api",
                  "--batch_poll_seconds", "0.1"]):
        r = run_cli(["-v", *args, *FAST], server, tmp_path)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout + r.stderr)
    r = run_cli(["responses", "--in", str(tasks), "--out", "bad.jsonl", *FAST], fake_server(require_key="x"),
                tmp_path)
    assert r.returncode == 1 and "AuthenticationError" in r.stderr
    outs.append(r.stdout + r.stderr)
    assert server.seen_auth and all(a == f"Bearer {TEST_KEY}" for a in server.seen_auth)  # the key was used
    for text in outs + [f.read_text(errors="replace") for f in tmp_path.rglob("*") if f.is_file()]:
        assert TEST_KEY not in text and TEST_KEY[8:] not in text
