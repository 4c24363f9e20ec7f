"""``contexts``: the reply parser, and the command against the real local server through the real CLI.

Privacy is enforced at the server: ``PrivacyGuard`` sees every request and fails the test
if one carries 4 consecutive words of a question outside a single keyword, or a planted
identifier. Resume is shown with two SIGKILLs of the real process, counted at the server.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from data_gen.contexts import (
    CONTEXT_SYSTEM,
    DEMONSTRATIONS,
    Malformed,
    format_context,
    format_query,
    load_keywords,
    parse_context,
    prompt_prefix,
)
from data_gen.errors import DataError
from tests.data_gen.fake_openai_server import MALFORMED_MARK, Faults, PrivacyGuard
from tests.data_gen.harness import (
    FAST,
    REPO,
    TEST_KEY,
    cli_env,
    kill_while_batch_runs,
    rerun_polling_the_held_batch,
    run_cli,
)
from tests.data_gen.mcq_synthetic import IDENTIFIER_VIGNETTES as VIGNETTES
from tests.data_gen.mcq_synthetic import ContextOracle, make_questions

OPTIONS = ["Apixaban", "Dabigatran", "Warfarin", "Aspirin alone"]
GOOD = """Overall: Atrial fibrillation with a mechanical valve needs lifelong anticoagulation.
(a) Apixaban: not recommended with mechanical valves.
(b) Dabigatran - more valve thrombosis than warfarin.
(c) A vitamin K antagonist, the standard for mechanical valves.
(d) Does not prevent valve thrombosis
on its own.
Preliminary answer: (c)"""


# ----------------------------------------------------------------------------------------------- parser

def test_parse_well_formed():
    p = parse_context(GOOD, OPTIONS)
    assert p.overall == "Atrial fibrillation with a mechanical valve needs lifelong anticoagulation."
    assert p.option_contexts == ["not recommended with mechanical valves.",  # repeated option text removed
                                 "more valve thrombosis than warfarin.",
                                 "A vitamin K antagonist, the standard for mechanical valves.",
                                 "Does not prevent valve thrombosis\non its own."]
    assert p.preliminary == 2


@pytest.mark.parametrize("reply,expected", [
    (GOOD.replace("Preliminary answer: (c)", "Preliminary answer: uncertain"), None),
    (GOOD.replace("Preliminary answer: (c)", "Preliminary answer: Warfarin."), 2),
    (GOOD.replace("Preliminary answer: (c)", "**Preliminary answer:** (D) Aspirin alone"), 3),
    ("Context:\n**Overall:** x\n**(a)** y\n**(b)** z\n(c) w\n(d) v\nPreliminary answer: a", 0),
    (GOOD.replace("Preliminary answer: (c)", "Preliminary answer: B."), 1),
    (GOOD.replace("Preliminary answer: (c)", "Preliminary answer: a drug is not needed"), None),
])
def test_parse_variants(reply, expected):
    assert parse_context(reply, OPTIONS).preliminary == expected


@pytest.mark.parametrize("reply,why", [
    (GOOD.replace("Overall: ", "Summary: "), "no 'Overall:'"),
    (GOOD.replace("(b) Dabigatran - more valve thrombosis than warfarin.\n", ""), "instead of"),
    (GOOD.replace("(d)", "(c)"), "instead of"),
    (GOOD.replace("(b) Dabigatran", "(b) Dabigatran\n(a) again"), "instead of"),
    (GOOD.replace("Preliminary answer: (c)", ""), "no 'Preliminary answer:'"),
    (GOOD + "\nPreliminary answer: (a)", "more than one"),
    (GOOD.replace("Preliminary answer: (c)", "Preliminary answer: (e)"), "not one of the options"),
    (GOOD.replace("(c) A vitamin K antagonist, the standard for mechanical valves.", "(c)"), "empty context"),
    ("Warfarin is the answer.", "no 'Overall:'"),
])
def test_parse_malformed(reply, why):
    with pytest.raises(Malformed, match=why):
        parse_context(reply, OPTIONS)


def test_parse_truncated():
    with pytest.raises(Malformed, match="truncated"):
        parse_context(GOOD, OPTIONS, finish_reason="length")  # complete-looking text, but cut at max_tokens
    with pytest.raises(Malformed):
        parse_context(GOOD[:120], OPTIONS)


def test_demonstrations_follow_the_layout():
    """The five demonstrations parse with the parser the replies go through."""
    assert len(DEMONSTRATIONS) == 5
    for keywords, options, overall, option_contexts, answer in DEMONSTRATIONS:
        assert len(option_contexts) == len(options)
        p = parse_context(format_context(overall, option_contexts, answer), options)
        assert (p.overall, p.option_contexts, p.preliminary) == (overall, option_contexts, "abcde".index(answer))
        assert format_query(keywords, options).startswith("Question Keywords: ")


def test_bad_keyword_records_name_file_record_field(tmp_path):
    path = tmp_path / "kw.jsonl"
    path.write_text(json.dumps({"id": "a", "keywords": ["x"], "options": {"A": "p", "B": "q"}}) + "\n"
                    + json.dumps({"id": "b", "keywords": "x", "options": {"A": "p", "B": "q"}}) + "\n")
    with pytest.raises(DataError, match=f"{path}, record 1, field 'keywords'"):
        load_keywords(path)


# ----------------------------------------------------------------------------------------------- CLI + server

def keywords_cli(tmp_path, questions: list[dict]) -> list[dict]:
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    r = subprocess.run([sys.executable, "-m", "data_gen", "keywords", "--in", "questions.jsonl", "--out",
                        "keywords.jsonl", "--no_progress"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in (tmp_path / "keywords.jsonl").read_text().splitlines()]


def read_jsonl(path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_bytes().split(b"\n"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # an empty or partly written last line
    return out


def privacy_setup(tmp_path, n_synthetic=40):
    syn = make_questions(n_synthetic, seed=11)
    questions = [q.record() for q in syn] + [
        {"id": f"vignette-{i}", "question": text, "options": ["Acute coronary syndrome", "Aortic dissection",
                                                              "Pericarditis", "Pulmonary embolism"]}
        for i, (text, _) in enumerate(VIGNETTES)]
    identifiers = [i for q in syn for i in q.identifiers] + [i for _, planted in VIGNETTES for i in planted]
    kws = keywords_cli(tmp_path, questions)
    by_id = {k["id"]: k["keywords"] for k in kws}
    guard = PrivacyGuard([(q["question"], by_id[q["id"]]) for q in questions], identifiers,
                         fixed_text=[CONTEXT_SYSTEM, prompt_prefix()])
    return syn, questions, guard


def test_privacy_enforced_at_the_server(fake_server, tmp_path):
    syn, questions, guard = privacy_setup(tmp_path)
    server = fake_server(request_check=guard, context_rule=ContextOracle(syn))
    r = run_cli(["contexts", "--keywords", "keywords.jsonl", "--out", "contexts.jsonl", *FAST], server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert server.checked == len(questions) and server.violations == []
    recs = read_jsonl(tmp_path / "contexts.jsonl")
    assert sorted(x["id"] for x in recs) == sorted(q["id"] for q in questions)
    truth = {q.id: q.answer for q in syn}
    for x in recs:
        assert set(x) >= {"id", "overall_context", "option_contexts", "preliminary_answer", "model"}
        assert list(x["option_contexts"]) == ["A", "B", "C", "D"] and x["model"] == "gpt-3.5-turbo"
        if x["id"] in truth:  # the context names the answer the question text does not give
            assert x["preliminary_answer"] == truth[x["id"]]
            assert x["option_contexts"][truth[x["id"]]].startswith("This answer is supported")
    assert json.loads(r.stderr.strip().splitlines()[-2]) == {"accepted": len(questions), "rejected_malformed": 0,
                                                              "rejected_truncated": 0, "missing": 0}
    for f in tmp_path.iterdir():  # no key in any output
        assert TEST_KEY not in f.read_text(errors="replace"), f
    assert TEST_KEY not in r.stderr + r.stdout


def test_privacy_guard_catches_leaks(fake_server, tmp_path):
    """The guard is not vacuous: question text or an identifier in the keywords is refused and reported."""
    syn, questions, guard = privacy_setup(tmp_path, n_synthetic=4)
    leaky = [{"id": "whole", "keywords": [questions[0]["question"]], "options": questions[0]["options"]},
             {"id": "part", "keywords": [" ".join(questions[1]["question"].split()[12:17])],
              "options": questions[1]["options"]},
             {"id": "ident", "keywords": ["chest pain", syn[2].identifiers[0]], "options": questions[2]["options"]},
             {"id": "clean", "keywords": ["chest pain", "diaphoresis"], "options": questions[2]["options"]}]
    (tmp_path / "leaky.jsonl").write_text("".join(json.dumps(x) + "\n" for x in leaky))
    server = fake_server(request_check=guard)
    r = run_cli(["contexts", "--keywords", "leaky.jsonl", "--out", "c.jsonl", *FAST], server, tmp_path)
    assert r.returncode == 1
    assert server.checked == 4 and len(server.violations) == 3, server.violations
    assert any("identifier" in v for v in server.violations)
    assert [x["id"] for x in read_jsonl(tmp_path / "c.jsonl")] == ["clean"]


def test_rejected_replies_are_counted_never_stored_as_results(fake_server, tmp_path):
    items = [{"id": f"q{i}", "keywords": ["fever", "neck stiffness"] + ([MALFORMED_MARK] if i % 3 == 0 else []),
              "options": {"A": "Bacterial meningitis", "B": "Migraine", "C": "Tension headache"}} for i in range(9)]
    (tmp_path / "kw.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    server = fake_server()
    args = ["contexts", "--keywords", "kw.jsonl", "--out", "c.jsonl", *FAST]
    r = run_cli(args, server, tmp_path)
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stderr.strip().splitlines()[-2])
    assert counts == {"accepted": 6, "rejected_malformed": 3, "rejected_truncated": 0, "missing": 0}
    assert sorted(x["id"] for x in read_jsonl(tmp_path / "c.jsonl")) == [f"q{i}" for i in range(9) if i % 3]
    rejected = read_jsonl(tmp_path / "c.jsonl.rejected.jsonl")
    assert sorted(x["id"] for x in rejected) == ["q0", "q3", "q6"]
    assert all(x["rejected"] == "malformed" and "instead of" in x["reason"] and x["raw"] for x in rejected)

    billed = server.stats()["billed"]
    assert run_cli(args, server, tmp_path).returncode == 0 and server.stats()["billed"] == billed  # not re-billed

    # Truncated replies (the context does not fit in max_tokens): rejected, not stored as results.
    r = run_cli([*args[:4], "c2.jsonl", "--max_tokens", "30", *FAST], server, tmp_path)
    counts = json.loads(r.stderr.strip().splitlines()[-2])
    assert counts["accepted"] == 0 and counts["rejected_truncated"] == 9
    assert read_jsonl(tmp_path / "c2.jsonl") == []
    # --retry_rejected asks again; with enough tokens the replies are accepted.
    r = run_cli([*args[:4], "c2.jsonl", "--retry_rejected", *FAST], server, tmp_path)
    assert json.loads(r.stderr.strip().splitlines()[-2])["accepted"] == 6
    assert len(read_jsonl(tmp_path / "c2.jsonl.rejected.jsonl")) == 9 + 3  # q0/q3/q6 rejected twice


def test_cost_cap_stops_cleanly_and_resumes(fake_server, tmp_path):
    syn = make_questions(12, seed=4, with_identifiers=False)
    keywords_cli(tmp_path, [q.record() for q in syn])
    server = fake_server(context_rule=ContextOracle(syn))
    # About 1000 prompt words + 1000 max tokens at $1 per 1k tokens: a few requests' worst case.
    price = ["--price_in", "1000", "--price_out", "1000", "--concurrency", "2"]
    r = run_cli(["contexts", "--keywords", "keywords.jsonl", "--out", "c.jsonl", "--max_cost", "5", *price, *FAST],
                server, tmp_path)
    assert r.returncode == 1 and "budget" in r.stderr
    done = len(read_jsonl(tmp_path / "c.jsonl"))
    assert 0 < done < 12 and server.stats()["billed"] == done
    r = run_cli(["contexts", "--keywords", "keywords.jsonl", "--out", "c.jsonl", *price, *FAST], server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(tmp_path / "c.jsonl")) == 12 and server.stats()["billed"] == 12


N_RESUME = 150
CONCURRENCY = 4


def test_resume_after_two_sigkills_live(fake_server, tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    syn = make_questions(N_RESUME, seed=seed % 1000)
    keywords_cli(tmp_path, [q.record() for q in syn])
    server = fake_server(latency=0.01, context_rule=ContextOracle(syn),
                         faults=Faults(p429=0.05, retry_after_ms=20, p500=0.05, seed=seed))
    out = tmp_path / "contexts.jsonl"
    cmd = [sys.executable, "-m", "data_gen", "contexts", "--keywords", "keywords.jsonl", "--out", str(out),
           "--concurrency", str(CONCURRENCY), *FAST, "--max_attempts", "20"]
    snapshots = []
    for _ in range(2):
        target = len(read_jsonl(out)) + rng.randrange(20, 50)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(server), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(read_jsonl(out)) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.03)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        snapshots.append({x["request_id"] for x in read_jsonl(out)})
        assert len(snapshots[-1]) < N_RESUME, f"seed {seed}: the run finished before it was killed"
    final = subprocess.run(cmd, cwd=tmp_path, env=cli_env(server), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, f"seed {seed}: {final.stderr[-2000:]}"

    recs = read_jsonl(out)
    ids = Counter(x["id"] for x in recs)
    assert sorted(ids) == sorted(q.id for q in syn) and set(ids.values()) == {1}, f"seed {seed}"  # one each
    truth = {q.id: q.answer for q in syn}
    assert all(x["preliminary_answer"] == truth[x["id"]] for x in recs)  # each reply is its own question's

    ok = [e for e in server.ledger if e["status"] == "ok"]
    runs = list(dict.fromkeys(e["run"] for e in server.ledger))  # the three processes, in order
    assert len(runs) == 3, f"seed {seed}"
    per_run = [Counter(e["request_id"] for e in ok if e["run"] == run) for run in runs]
    assert all(max(c.values()) == 1 for c in per_run), f"seed {seed}"  # no process pays twice for one request
    billed = Counter(e["request_id"] for e in ok)
    assert set(billed) == {x["request_id"] for x in recs}
    for rid, n in billed.items():
        if n > 1:  # billed again only when it was in flight at a kill: its reply never reached the disk
            first = next(k for k, c in enumerate(per_run) if rid in c)
            assert rid not in snapshots[first], f"seed {seed}: stored request {rid} was billed again"
    assert sum(billed.values()) - N_RESUME <= 2 * CONCURRENCY, f"seed {seed}"


def test_resume_after_two_sigkills_batch_api_bills_each_request_once(fake_server, tmp_path):
    """With --batch_api the batch id is stored before polling: killed runs poll it again, never resubmit."""
    syn = make_questions(30, seed=8)
    kws = {k["id"]: k["keywords"] for k in keywords_cli(tmp_path, [q.record() for q in syn])}
    guard = PrivacyGuard([(q.question, kws[q.id]) for q in syn], [i for q in syn for i in q.identifiers],
                         fixed_text=[CONTEXT_SYSTEM, prompt_prefix()])  # the batch path is guarded too
    server = fake_server(batch_delay=0.05, context_rule=ContextOracle(syn), request_check=guard, hold_batches=True)
    out = tmp_path / "c.jsonl"
    args = ["contexts", "--keywords", "keywords.jsonl", "--out", str(out), "--batch_api", "--batch_poll_seconds",
            "0.05", *FAST]
    state = tmp_path / "c.jsonl.batches.json"
    for _ in range(2):  # both killed while the batch runs: the first after submitting it, the second polling it
        kill_while_batch_runs(args, server, tmp_path, state)
        assert read_jsonl(out) == []
    final = rerun_polling_the_held_batch(args, server, tmp_path)
    assert final.returncode == 0, final.stderr
    assert len(server.batches) == 1 and len(json.loads(state.read_text())["batches"]) == 1
    billed = Counter(e["request_id"] for e in server.ledger if e["status"] == "ok")
    assert sorted(billed) == sorted(f"ctx-{q.id}" for q in syn) and set(billed.values()) == {1}
    assert Counter(x["id"] for x in read_jsonl(out)) == Counter(q.id for q in syn)
    assert server.checked == 30 and server.violations == []


def test_synthetic_answers_are_in_the_context_only():
    """What the end-to-end test relies on: nothing in a synthetic question points to its answer."""
    qs = make_questions(2000, seed=0)
    assert len({q.finding for q in qs}) == len(qs)  # a new finding per question: nothing to memorise
    for q in qs:
        assert not set(q.options[q.answer].lower().split()) & set(q.question.lower().split())
    letters = Counter(q.answer for q in qs)
    assert all(abs(letters[x] / len(qs) - 0.25) < 0.04 for x in "ABCD"), letters  # no favourite position
    shown, correct = Counter(), Counter()
    for q in qs:
        shown.update(q.options.values())
        correct[q.options[q.answer]] += 1
    assert all(abs(correct[d] / shown[d] - 0.25) < 0.12 for d in shown)  # no favourite disease
    oracle = ContextOracle(qs)
    assert all(oracle([f"{q.finding} rash"], list(q.options.values())) == "ABCD".index(q.answer) for q in qs)
    assert oracle(["chest pain"], list(qs[0].options.values())) is None
    half = ContextOracle(qs, accuracy=0.5)  # an imperfect LLM: right for about half of the questions
    right = sum(half([q.finding], list(q.options.values())) == "ABCD".index(q.answer) for q in qs)
    assert 0.45 < right / len(qs) < 0.55
