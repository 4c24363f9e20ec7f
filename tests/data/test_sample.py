"""The bundled MedInstruct-format sample: enough varied, well-formed records, in sync with its generator."""

import collections
import importlib.util
import json

from alpacare_jax.data import SAMPLE_JSON
from alpacare_jax.data.prompts import has_input
from alpacare_jax.data.records import read_medinstruct_52k

FIELDS = ["instruction", "input", "output", "type", "topic", "view", "difficulty"]


def test_sample_is_valid_medinstruct_52k_with_variety():
    raw = json.loads(SAMPLE_JSON.read_text())
    assert all(list(r) == FIELDS for r in raw)
    records, skipped = read_medinstruct_52k(SAMPLE_JSON)
    assert skipped == 0 and len(records) >= 100
    assert len({(r["instruction"], r["input"]) for r in records}) == len(records)
    counts = {f: collections.Counter(r[f] for r in records) for f in ("type", "topic", "view", "difficulty")}
    assert len(counts["type"]) >= 8 and len(counts["topic"]) >= 15 and len(counts["view"]) >= 5
    assert set(counts["difficulty"]) == {"1", "2", "3", "4", "5"}
    with_input = sum(has_input(r["input"]) for r in records)
    assert 20 <= with_input <= len(records) - 20
    assert all(r["input"] == "<noinput>" for r in records if not has_input(r["input"]))
    # Outputs are a few sentences: long enough to teach something, short enough for the CPU demo.
    assert all(80 <= len(r["output"]) <= 800 for r in records)


def test_sample_matches_its_generator():
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE_JSON.with_name("make_sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_records() == json.loads(SAMPLE_JSON.read_text())
