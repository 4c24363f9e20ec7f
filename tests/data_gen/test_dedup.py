"""Dedup: the fast keep-first result equals a brute-force rouge_score computation."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import rouge_scorer

from data_gen.dedup import deduplicate, rouge_tokenize
from data_gen.synthetic import variants
from tests.data_gen.harness import REPO


def rouge_f(a: list[str], b: list[str]) -> float:
    return rouge_scorer._score_lcs(a, b).fmeasure


def brute_keep_first_rouge(cands: list[str], seeds: list[str], thr: float) -> list[int]:
    """Keep-first with rouge_score's own _score_lcs for every pair (slow: small inputs only)."""
    toks = rouge_tokenize(cands)
    pool = rouge_tokenize(seeds)
    kept = []
    for i, t in enumerate(toks):
        if all(rouge_f(t, p) <= thr for p in pool):
            kept.append(i)
            pool.append(t)
    return kept


def test_small_equals_pure_rouge_score(seed_tasks):
    seeds = [t["instruction"] for t in seed_tasks[:40]]
    cands = variants(seeds, 300, seed=3)
    for thr in (0.7, 0.5):
        res = deduplicate(cands, seeds, thr)
        assert res.kept == brute_keep_first_rouge(cands, seeds, thr)
        assert 0 < len(res.kept) < len(cands)


def test_5000_equals_brute_force(seed_tasks, alpacare_data):
    """>= 5,000 instructions (seeds + generated variants) against brute force over ALL pairs.

    The brute force scores every pair: the LCS of all pairs with rapidfuzz (a full matrix,
    no pruning), F with rouge_score's arithmetic, and every pair near the threshold, plus a
    random sample of the others, re-scored with rouge_score's own pure-Python ``_score_lcs``.
    """
    seeds = [t["instruction"] for t in seed_tasks]
    test_instr = [json.loads(line)["instruction"] for line in (alpacare_data / "MedInstruct-test.jsonl").open()]
    cands = variants(seeds + test_instr, 5000, seed=11)
    thr = 0.7
    res = deduplicate(cands, seeds, thr)

    texts = seeds + cands
    toks = rouge_tokenize(texts)
    vocab: dict[str, int] = {}
    strs = ["".join(chr(0x100 + vocab.setdefault(w, len(vocab))) for w in t) for t in toks]
    lcs = process.cdist(strs, strs, scorer=LCSseq.similarity, dtype=np.int32, workers=1)
    lens = np.array([len(t) for t in toks], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = lcs / lens[None, :]
        r = lcs / lens[:, None]
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    # rouge_score's own scorer agrees on near-threshold pairs and on a random sample of all pairs
    near = np.argwhere((f > thr - 0.05) & (f < thr + 0.05))
    rng = np.random.default_rng(0)
    sample = rng.integers(0, len(texts), size=(3000, 2))
    for i, j in list(near[:3000]) + list(sample):
        assert rouge_f(toks[i], toks[j]) == pytest.approx(f[i, j], abs=0), (texts[i], texts[j])
    above = f > thr
    ns = len(seeds)
    kept_mask = np.zeros(len(texts), dtype=bool)
    kept_mask[:ns] = True
    expected = []
    for i in range(ns, len(texts)):
        if not above[i, kept_mask].any():
            kept_mask[i] = True
            expected.append(i - ns)
    assert res.kept == expected
    assert 1000 < len(expected) < 4500  # a real mix of kept and dropped
    # each dropped instruction names an earlier kept one (or a seed) that it duplicates
    for d in res.dropped:
        j = d["duplicate_of"] if d["duplicate_of_seed"] else d["duplicate_of"] + ns
        assert kept_mask[j] and j < d["index"] + ns
        assert rouge_f(toks[d["index"] + ns], toks[j]) == d["rouge_l"] > thr


def test_all_vs_all_drops_both_members_like_alpacare():
    a = "Explain the first-line treatment of type 2 diabetes in elderly patients."
    b = "Explain the first-line treatment of type 2 diabetes in older patients."
    c = "Describe the classic symptoms of appendicitis in children."
    keep_first = deduplicate([a, b, c], [], 0.7)
    assert keep_first.kept == [0, 2] and keep_first.dropped[0]["duplicate_of"] == 0
    alpacare = deduplicate([a, b, c], [], 0.7, rule="all-vs-all")
    assert alpacare.kept == [2]  # both members of the near-duplicate pair are gone


def test_all_vs_all_equals_brute_force(seed_tasks):
    seeds = [t["instruction"] for t in seed_tasks[:30]]
    cands = variants(seeds, 250, seed=5)
    toks_s, toks_c = rouge_tokenize(seeds), rouge_tokenize(cands)
    everything = toks_s + toks_c
    expected = [i for i, t in enumerate(toks_c)
                if all(rouge_f(t, o) <= 0.7 for k, o in enumerate(everything) if k != len(toks_s) + i)]
    assert deduplicate(cands, seeds, 0.7, rule="all-vs-all").kept == expected


def test_cli_dedup_from_generation_store(tmp_path, seed_tasks, alpacare_data):
    raw = tmp_path / "raw.jsonl"
    texts = variants([t["instruction"] for t in seed_tasks], 400, seed=2)
    rng = random.Random(0)
    with raw.open("w") as f:  # a generation store whose requests finished out of order
        ids = list(range(40))
        rng.shuffle(ids)
        for k in ids:
            f.write(json.dumps({"request_id": f"gen-s0-{k:07d}", "tasks": [
                {"instruction": texts[10 * k + j], "input": "<noinput>", "type": "t", "topic": "x", "view": "v",
                 "difficulty": "1"} for j in range(10)]}) + "\n")
    out = subprocess.run([sys.executable, "-m", "data_gen", "dedup", "--in", str(raw), "--seeds",
                          str(alpacare_data / "med_seed.json"), "--out", str(tmp_path / "kept.json"),
                          "--dropped", str(tmp_path / "dropped.jsonl"), "--no_progress"],
                         cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    kept = json.loads((tmp_path / "kept.json").read_text())
    expected = deduplicate(texts, [t["instruction"] for t in seed_tasks]).kept
    assert [k["instruction"] for k in kept] == [texts[i] for i in expected]
    assert all("source" in k and k["type"] == "t" for k in kept)
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").open()]
    assert len(dropped) + len(kept) == 400
    assert all(d["duplicate_of_instruction"] for d in dropped)
