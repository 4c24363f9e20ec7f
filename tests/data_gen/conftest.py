"""Fixtures for data_gen tests: a real local OpenAI-compatible server and the AlpaCare release files."""

from __future__ import annotations

import json

import pytest

from tests.data_gen.fake_openai_server import FakeOpenAI


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
