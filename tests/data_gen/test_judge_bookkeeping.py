"""The judge's numbers are never silently wrong: missing examples, AlpaCare's file layout, truncated
verdicts, the win-rate arithmetic, exit statuses and the Batch API after a kill.

Every test runs the real CLI (a subprocess with the real ``openai`` client) against the local
OpenAI-compatible HTTP server, on AlpaCare's released reference files.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from data_gen import DataError, read_summaries
from data_gen.__main__ import main
from tests.data_gen.fake_openai_server import Faults
from tests.data_gen.harness import (
    FAST,
    cli_env,
    kill_while_batch_runs,
    read_summary,
    rerun_polling_the_held_batch,
    run_cli,
)

DOCTOR = "If you are a doctor, please answer the medical questions based on the patient's description."


def reference_lines(alpacare_data: Path, model: str, test_set: str, n: int | None = None) -> list[str]:
    lines = (alpacare_data / "reference_outputs" / model / test_set).read_text().splitlines()
    return lines[:n] if n else lines


def write_reference(dst: Path, lines: list[str]) -> Path:
    """A reference file in AlpaCare's ``<model>/<file>`` layout (a slice of the real one, for speed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(line + "\n" for line in lines))
    return dst


def longer(a: str, b: str) -> str:
    return "Tie" if len(a) == len(b) else ("Output (a)" if len(a) > len(b) else "Output (b)")


def test_missing_examples_are_listed_and_fail_the_run(fake_server, tmp_path, alpacare_data):
    server = fake_server(judge=longer)
    ref = alpacare_data / "reference_outputs" / "gpt-4" / "medsi_output.jsonl"
    rows = [json.loads(line) for line in ref.read_text().splitlines()]
    removed = [3, 17, 40, 41, 99, 120, 150, 188, 200, 215]
    outs = [{"id": i, "instruction": r["instruction"], "input": r["input"], "output": r["output"] + " More.",
             "generator": "m"} for i, r in enumerate(rows) if i not in removed]
    (tmp_path / "m.json").write_text(json.dumps(outs))
    args = ["judge", "--outputs", "m.json", "--reference", str(ref), "--annotations", "ann.jsonl",
            "--concurrency", "32", *FAST]
    r = run_cli(args, server, tmp_path)
    assert r.returncode == 3, r.stderr
    assert "m vs gpt-4 on MedInstruct-test: win rate 100.0 +- 0.0 | reference examples: 206 judged of 216, " \
           "10 missing | verdicts: 0 truncated, 0 unparseable, 0 pending" in r.stdout
    assert "10 of 216 reference examples have no model output (ids: 3, 17, 40, 41, 99, 120, 150, 188, 200, 215)" \
        in r.stderr
    s = read_summary(tmp_path, "m", "gpt-4", "MedInstruct-test")
    assert (s["n_missing"], s["missing_ids"], s["complete"]) == (10, [str(i) for i in removed], False)
    assert (s["n_examples"], s["n_reference"], s["n_judgements"]) == (206, 216, 412)
    assert server.stats()["billed"] == 412
    r = run_cli([*args, "--allow_missing"], server, tmp_path)  # opted in: status 0, still listed, nothing re-billed
    assert r.returncode == 0 and "10 of 216 reference examples have no model output" in r.stderr
    assert server.stats()["billed"] == 412


def test_alpacare_release_layout_pairs_by_content(fake_server, tmp_path, alpacare_data):
    server = fake_server(judge=longer)
    n = 30
    medsi = reference_lines(alpacare_data, "gpt-4", "medsi_output.jsonl", n)
    icliniq = reference_lines(alpacare_data, "gpt-4", "iCliniq_output.jsonl", n)
    refs = [write_reference(tmp_path / "reference_outputs" / "gpt-4" / "medsi_output.jsonl", medsi),
            write_reference(tmp_path / "reference_outputs" / "gpt-4" / "iCliniq_output.jsonl", icliniq)]
    # AlpaCare's data/model_ouputs/<model>/<test set>/seed_0.json: a JSON list of {id, instruction, [input],
    # raw_output, response}; on iCliniq the instruction is a fixed header and the question is the input
    model = tmp_path / "model_ouputs" / "AlpaCare-7b"
    (model / "medinstruct").mkdir(parents=True)
    (model / "iCliniq").mkdir()
    (model / "medinstruct" / "seed_0.json").write_text(json.dumps(
        [{"id": i, "instruction": json.loads(x)["instruction"], "raw_output": "...", "response": "A short answer."}
         for i, x in enumerate(medsi)]))
    (model / "iCliniq" / "seed_0.json").write_text(json.dumps(
        [{"id": i, "instruction": DOCTOR, "input": json.loads(x)["input"], "raw_output": "...",
          "response": json.loads(x)["output"] + " And see a doctor."} for i, x in enumerate(icliniq)]))
    outputs = [str(model / "medinstruct" / "seed_0.json"), str(model / "iCliniq" / "seed_0.json")]
    args = ["judge", "--outputs", *outputs, "--reference", *map(str, refs), "--annotations", "ann.jsonl", *FAST]
    r = run_cli(args, server, tmp_path)
    assert r.returncode == 0, r.stderr
    med = read_summary(tmp_path, "AlpaCare-7b", "gpt-4", "MedInstruct-test")
    icl = read_summary(tmp_path, "AlpaCare-7b", "gpt-4", "iCliniq")
    assert (med["n_examples"], med["n_reference"], med["win_rate"], med["complete"]) == (n, n, 0.0, True)
    assert (icl["n_examples"], icl["n_reference"], icl["win_rate"], icl["complete"]) == (n, n, 100.0, True)
    assert server.stats()["billed"] == 2 * 2 * n
    assert "AlpaCare-7b vs gpt-4 on iCliniq: win rate 100.0" in r.stdout
    # an explicit test set per reference file names the results; the verdicts come from the cache
    r = run_cli([*args, "--test_set", "MedInstruct-30", "iCliniq-30"], server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert read_summary(tmp_path, "AlpaCare-7b", "gpt-4", "iCliniq-30")["win_rate"] == 100.0
    assert read_summary(tmp_path, "AlpaCare-7b", "gpt-4", "MedInstruct-30")["win_rate"] == 0.0
    assert server.stats()["billed"] == 2 * 2 * n
    # outputs that answer neither reference set: a one-line input error, never "0 of 0" and exit 0
    (tmp_path / "other.json").write_text(json.dumps([{"instruction": "Name a bone.", "output": "Femur."}]))
    r = run_cli(["judge", "--outputs", "other.json", "--reference", *map(str, refs), "--annotations", "ann.jsonl",
                 *FAST], server, tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: other.json: answers none of the reference sets: at most 0 of its 1 records match one ({refs[0]})"]


def verbose_judge(a: str, b: str) -> str:
    """A judge that reasons before its verdict: cut at 32 words its reply reads '... Both Output (a) and'."""
    return ("Let me weigh accuracy, safety, completeness and clarity for the person who asked, point by point, "
            "as a careful senior physician would do before deciding anything here. "
            f"Both Output (a) and Output (b) are reasonable.\nVerdict: {longer(a, b)}")


def test_truncated_verdicts_are_asked_again_never_parsed(fake_server, tmp_path, alpacare_data):
    server = fake_server(judge=verbose_judge)
    n = 20
    ref = write_reference(tmp_path / "gpt-4" / "medsi_output.jsonl",
                          reference_lines(alpacare_data, "gpt-4", "medsi_output.jsonl", n))
    rows = [json.loads(line) for line in ref.read_text().splitlines()]
    (tmp_path / "m.json").write_text(json.dumps([{"instruction": r["instruction"], "input": r["input"],
                                                  "output": r["output"] + " More.", "generator": "m"} for r in rows]))
    base = ["judge", "--outputs", "m.json", "--reference", str(ref), *FAST]
    summary = lambda: read_summary(tmp_path, "m", "gpt-4", "MedInstruct-test")  # noqa: E731

    # live with the default cap: each verdict is cut at 32, asked again at 64, and parsed only then
    r = run_cli([*base, "--annotations", "live.jsonl"], server, tmp_path)
    assert summary()["win_rate"] == 100.0, r.stderr  # cut replies parsed as wins for (a) made it 50.0
    assert r.returncode == 0, r.stderr
    sizes = {}
    for e in server.ledger:
        sizes.setdefault(e["request_id"], []).append(e["max_tokens"])
    assert len(sizes) == 2 * n and all(v == [32, 64] for v in sizes.values())
    # capped at the first size: every verdict stays truncated, is counted as such and scores nothing
    billed = len(server.ledger)
    r = run_cli([*base, "--annotations", "capped.jsonl", "--judge_max_tokens_cap", "32"], server, tmp_path)
    s = summary()
    assert (s["n_truncated"], s["n_unparseable"], s["n_examples"], s["n_judgements"]) == (2 * n, 0, 0, 2 * n)
    assert r.returncode == 1 and "no scored verdict" in r.stderr and "40 truncated" in r.stdout
    assert [e["max_tokens"] for e in server.ledger[billed:]] == [32] * 2 * n
    # not cached as final: with room to grow, the rerun asks them again with twice the max_tokens
    billed = len(server.ledger)
    r = run_cli([*base, "--annotations", "capped.jsonl"], server, tmp_path)
    assert r.returncode == 0, r.stderr
    s = summary()
    assert (s["win_rate"], s["n_examples"], s["n_truncated"], s["n_unparseable"]) == (100.0, n, 0, 0)
    assert [e["max_tokens"] for e in server.ledger[billed:]] == [64] * 2 * n
    # a cache written before this fix holds truncated replies parsed as verdicts ("... Output (a) and" -> a):
    # they are not trusted, but asked again
    old = [{**json.loads(line), "verdict": "a", "raw": "Both Output (a) and"} for line in
           (tmp_path / "live.jsonl").read_text().splitlines()]
    for rec in old:
        rec.update(finish_reason="length")
        rec.pop("max_tokens")
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in old))
    billed = len(server.ledger)
    r = run_cli([*base, "--annotations", "old.jsonl"], server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(server.ledger) - billed == 2 * 2 * n  # 32 then 64 for each verdict
    assert summary()["win_rate"] == 100.0


def judge_fn(a: str, b: str) -> str:
    """The audit's judge: its verdict is a known function of the two outputs as shown (a first)."""
    if "UNSURE" in a + b:
        return "I cannot decide."  # unparseable in both orders: the example scores nothing
    if "HALF" in a:
        return "Both Output (a) and Output (b) have merit."  # unparseable when the model is shown first
    if "FIRST" in a + b:
        return "Output (a)"  # position bias: one win and one loss
    if "EVEN" in a + b or len(a) == len(b):
        return "Tie"
    return "Output (a)" if len(a) > len(b) else "Output (b)"


def audit_outputs(reference: list[dict]) -> list[str]:
    """Model outputs covering every branch of judge_fn."""
    kinds = [lambda r: r + " Further detail.", lambda r: r[: len(r) // 2], lambda r: "EVEN " + r,
             lambda r: "UNSURE " + r, lambda r: "HALF " + r, lambda r: "FIRST " + r[:20]]
    return [kinds[k % len(kinds)](r["output"].strip()) for k, r in enumerate(reference)]


def expected_from_raw_files(model_file: Path, reference_file: Path) -> dict:
    """The win rate computed independently of data_gen, from the two raw files and judge_fn."""
    model = {(m["instruction"], m["input"]): m["output"].strip() for m in json.loads(model_file.read_text())}
    parsed = {"Output (a)": "a", "Output (b)": "b", "Tie": "tie"}
    means, counts = [], {"wins": 0, "ties": 0, "losses": 0, "n_unparseable": 0}
    for line in reference_file.read_text().splitlines():
        r = json.loads(line)
        m, ref = model[(r["instruction"], r["input"])], (r.get("output") or r.get("response")).strip()
        scores = []
        for shown, model_is_a in (((m, ref), True), ((ref, m), False)):
            v = parsed.get(judge_fn(*shown))
            if v is None:
                counts["n_unparseable"] += 1
                continue
            score = 0.5 if v == "tie" else float((v == "a") == model_is_a)
            counts[{1.0: "wins", 0.5: "ties", 0.0: "losses"}[score]] += 1
            scores.append(score)
        if scores:
            means.append(sum(scores) / len(scores))
    return {"win_rate": 100 * statistics.mean(means), "stderr": 100 * statistics.stdev(means) / math.sqrt(len(means)),
            "n_examples": len(means), **counts}


def test_win_rate_arithmetic_audit(fake_server, tmp_path, alpacare_data):
    server = fake_server(judge=judge_fn)
    n = 36
    refs = {name: write_reference(tmp_path / name / "medsi_output.jsonl",
                                  reference_lines(alpacare_data, name, "medsi_output.jsonl", n))
            for name in ("gpt-4", "claude-2")}
    gpt4 = [json.loads(line) for line in refs["gpt-4"].read_text().splitlines()]
    model_file = tmp_path / "m.json"
    model_file.write_text(json.dumps([{"instruction": r["instruction"], "input": r["input"], "output": o,
                                       "generator": "m"} for r, o in zip(gpt4, audit_outputs(gpt4))]))
    r = run_cli(["judge", "--outputs", "m.json", "--reference", *map(str, refs.values()), "--annotations", "a.jsonl",
                 *FAST], server, tmp_path)
    assert r.returncode == 0, r.stderr
    for name, ref_file in refs.items():
        s = read_summary(tmp_path, "m", name, "MedInstruct-test")
        want = expected_from_raw_files(model_file, ref_file)
        got = {k: s[k] for k in want}
        assert got == pytest.approx(want), name
        assert s["n_judgements"] == 2 * n and s["n_truncated"] == 0 and s["complete"]
        # every branch was exercised: ties, unparseable ones and examples left without a scored verdict
        assert want["ties"] and want["n_unparseable"] and want["n_examples"] < n
    assert server.stats()["billed"] == 2 * 2 * n


def test_responses_doubles_max_tokens_from_the_last_attempt(fake_server, tmp_path, seed_tasks):
    # a server that cuts every reply off and reports no usage (so completion_tokens tells nothing)
    server = fake_server(truncate_all=True, usage=False)
    (tmp_path / "tasks.json").write_text(json.dumps(seed_tasks[:2]))
    r = run_cli(["responses", "--in", "tasks.json", "--out", "a.jsonl", "--export", "a.json", *FAST], server, tmp_path)
    assert r.returncode == 0, r.stderr
    sizes = {}
    for e in server.ledger:
        sizes.setdefault(e["request_id"], []).append(e["max_tokens"])
    assert list(sizes.values()) == [[1024, 2048, 4096]] * 2
    assert "2 answers were still truncated (max_tokens: 2 at 4096)" in r.stderr
    recs = final_records(tmp_path / "a.jsonl").values()
    assert all(x["truncated"] and x["max_tokens"] == 4096 for x in recs)
    # a higher cap: still doubling from the last attempt, past the old fixed number of rounds
    r = run_cli(["responses", "--in", "tasks.json", "--out", "b.jsonl", "--max_tokens_cap", "16384", *FAST],
                server, tmp_path)
    assert r.returncode == 0, r.stderr
    sizes = {}
    for e in server.ledger[6:]:
        sizes.setdefault(e["request_id"], []).append(e["max_tokens"])
    assert list(sizes.values()) == [[1024, 2048, 4096, 8192, 16384]] * 2


def test_input_path_errors_are_one_line_with_status_2(fake_server, tmp_path, alpacare_data, monkeypatch, capsys):
    server = fake_server()
    ref = alpacare_data / "reference_outputs" / "gpt-4" / "medsi_output.jsonl"
    (tmp_path / "adir").mkdir()
    first = json.loads(ref.read_text().splitlines()[0])
    (tmp_path / "m.json").write_text(json.dumps([{"instruction": first["instruction"], "output": "y"}]))
    cases = [(["judge", "--outputs", "m.json", "--reference", "adir", "--annotations", "a.jsonl"],
              "error: adir: is a directory, expected a file"),
             (["judge", "--outputs", "adir", "--reference", str(ref), "--annotations", "a.jsonl"],
              "error: adir: is a directory, expected a file"),
             (["judge", "--outputs", "m.json", "--reference", "nope.jsonl", "--annotations", "a.jsonl"],
              "error: nope.jsonl: file not found"),
             (["judge", "--outputs", "m.json", "--reference", str(ref), "--annotations", "adir"],
              "error: adir: is a directory, expected a file"),
             (["responses", "--in", "adir", "--out", "o.jsonl"], "error: adir: is a directory, expected a file")]
    monkeypatch.chdir(tmp_path)
    for key, value in cli_env(server).items():
        monkeypatch.setenv(key, value)
    for args, line in cases:  # in-process: nothing here reaches the server, and each interpreter start is slow
        status = main([*args, *FAST])
        assert (status, capsys.readouterr().err.strip().splitlines()) == (2, [line]), args
    assert server.stats()["billed"] == 0


def test_errors_file_lists_only_requests_still_failed(fake_server, tmp_path, seed_tasks):
    (tmp_path / "tasks.json").write_text(json.dumps(seed_tasks[:5]))
    args = ["responses", "--in", "tasks.json", "--out", "r.jsonl", *FAST, "--max_attempts", "1"]
    errors = tmp_path / "r.jsonl.errors.jsonl"
    broken = fake_server(faults=Faults(p500=1.0))
    for _ in range(2):  # failing twice: still one line per request, the latest error
        r = run_cli(args, broken, tmp_path)
        assert r.returncode == 1
        assert len(errors.read_text().splitlines()) == 5
    r = run_cli(args, fake_server(faults=Faults(p500=0.5, seed=3)), tmp_path)
    stored = {json.loads(line)["request_id"] for line in (tmp_path / "r.jsonl").read_text().splitlines()}
    listed = {json.loads(line)["request_id"] for line in errors.read_text().splitlines()} if errors.exists() else set()
    assert 0 < len(stored) < 5 and len(stored) + len(listed) == 5 and not stored & listed
    r = run_cli(args, fake_server(), tmp_path)
    assert r.returncode == 0 and not errors.exists()  # everything done: nothing left to list


def test_verbose_log_never_shows_the_http_transport(fake_server, tmp_path, seed_tasks):
    (tmp_path / "tasks.json").write_text(json.dumps(seed_tasks[:2]))
    r = run_cli(["-v", "responses", "--in", "tasks.json", "--out", "r.jsonl", *FAST], fake_server(), tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(" DEBUG " in line for line in lines)  # -v is on (asyncio, for one, logs at DEBUG)
    transport = re.compile(r" (DEBUG|INFO) (openai|httpx|httpcore|h11|h2)")  # any generation: httpcore2.http11, ...
    noisy = [line for line in lines if transport.search(line)]
    assert noisy == [], noisy[:3]


def icliniq_outputs(tmp_path: Path, alpacare_data: Path, n: int) -> Path:
    """The first n iCliniq reference answers (gpt-4) and a model that wins 3 in 4 of them (the judge: `longer`)."""
    ref = write_reference(tmp_path / "gpt-4" / "iCliniq_output.jsonl",
                          reference_lines(alpacare_data, "gpt-4", "iCliniq_output.jsonl", n))
    rows = [json.loads(line) for line in ref.read_text().splitlines()]
    (tmp_path / "m.json").write_text(json.dumps([
        {"id": i, "instruction": DOCTOR, "input": r["input"], "generator": "m",
         "output": r["output"] + " More." if i % 4 else "See a doctor."} for i, r in enumerate(rows)]))
    return ref


def test_batch_judge_survives_a_kill_between_submission_and_completion(fake_server, tmp_path, alpacare_data):
    server = fake_server(judge=longer, batch_delay=0.05, hold_batches=True)
    n = 20
    ref = icliniq_outputs(tmp_path, alpacare_data, n)
    args = ["judge", "--outputs", "m.json", "--reference", str(ref), "--annotations", "ann.jsonl", "--batch_api",
            "--batch_poll_seconds", "0.1", *FAST]
    kill_while_batch_runs(args, server, tmp_path, tmp_path / "ann.jsonl.batches.json")
    assert server.stats().get("billed", 0) == 0
    assert not (tmp_path / "ann.jsonl").exists() or not (tmp_path / "ann.jsonl").read_text()
    r = rerun_polling_the_held_batch(args, server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(server.batches) == 1 and server.stats()["billed"] == 2 * n  # polled, not submitted again
    s = read_summary(tmp_path, "m", "gpt-4", "iCliniq")
    assert (s["win_rate"], s["n_examples"], s["complete"]) == (75.0, n, True)
    r = run_cli(args, server, tmp_path)  # nothing left: no batch, no bill
    assert r.returncode == 0 and len(server.batches) == 1 and server.stats()["billed"] == 2 * n

    # a verdict cut off in a batch is asked again in a second batch round, with twice the max_tokens
    verbose = fake_server(judge=verbose_judge, batch_delay=0.05)
    r = run_cli(["judge", "--outputs", "m.json", "--reference", str(ref), "--annotations", "v.jsonl", "--batch_api",
                 "--batch_poll_seconds", "0.05", *FAST], verbose, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(verbose.batches) == 2 and [e["max_tokens"] for e in verbose.ledger] == [32] * 2 * n + [64] * 2 * n
    s = read_summary(tmp_path, "m", "gpt-4", "iCliniq")
    assert (s["win_rate"], s["n_examples"], s["n_truncated"], s["complete"]) == (75.0, n, 0, True)


def test_max_cost_bounds_every_batch_round_together(fake_server, tmp_path, alpacare_data):
    """One budget for the whole command: batch rounds (verdicts cut off, asked again) share it, and a verdict
    cut off below the cap when the budget stops the run is pending, not truncated."""
    n = 20
    ref = icliniq_outputs(tmp_path, alpacare_data, n)
    # $1 per completion token, half price in batches: round 1 reserves 40 x 32 / 2 = 640 and is billed as much
    # (every verdict is cut off at 32); round 2 reserves 40 x 64 / 2 = 1280 and is billed 40 x 38 / 2 = 760.
    # 1300 covers either round alone (a budget per round let both run: 1400 spent), not both; 2000 covers
    # both, unless round 1's reservation were kept after it was billed.
    args = ["judge", "--outputs", "m.json", "--reference", str(ref), "--batch_api", "--batch_poll_seconds", "0.05",
            "--price_in", "0", "--price_out", "1000000", *FAST]
    server = fake_server(judge=verbose_judge, batch_delay=0.05)
    r = run_cli([*args, "--annotations", "a.jsonl", "--max_cost", "1300"], server, tmp_path)
    assert r.returncode == 1 and "STOPPED: budget of $1300.0000 reached" in r.stderr, r.stderr
    assert len(server.batches) == 1 and [e["max_tokens"] for e in server.ledger] == [32] * 2 * n
    assert ", $640.0000, " in r.stderr
    s = read_summary(tmp_path, "m", "gpt-4", "iCliniq")
    assert (s["n_pending"], s["n_truncated"], s["n_examples"], s["complete"]) == (2 * n, 0, 0, False)
    assert "0 truncated, 0 unparseable, 40 pending" in r.stdout
    # the rerun, with budget for its round, asks them with twice the max_tokens; nothing else is billed
    r = run_cli([*args, "--annotations", "a.jsonl", "--max_cost", "1300"], server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert [e["max_tokens"] for e in server.ledger] == [32] * 2 * n + [64] * 2 * n
    s = read_summary(tmp_path, "m", "gpt-4", "iCliniq")
    assert (s["win_rate"], s["n_pending"], s["n_truncated"], s["complete"]) == (75.0, 0, 0, True)
    # enough for both rounds at once: what round 1 reserved is released once it is billed
    r = run_cli([*args, "--annotations", "b.jsonl", "--max_cost", "2000"], fake_server(judge=verbose_judge,
                                                                                    batch_delay=0.05), tmp_path)
    assert r.returncode == 0, r.stderr


def test_every_comparison_has_a_summary_file_of_its_own(fake_server, tmp_path, alpacare_data):
    """Two outputs files of one model (seed_0, seed_1) against two reference folders of one name: four numbers,
    four files, none replacing another; the same four on a rerun; a table reader refuses to pick one."""
    server = fake_server(judge=longer)
    n = 10
    lines = reference_lines(alpacare_data, "gpt-4", "medsi_output.jsonl", n)
    rows = [json.loads(line) for line in lines]
    longer_lines = [json.dumps({**r, "output": r["output"] + " Further detail." * 20}) for r in rows]
    refs = {"refs_a": write_reference(tmp_path / "refs_a" / "gpt-4" / "medsi_output.jsonl", lines),
            "refs_b": write_reference(tmp_path / "refs_b" / "gpt-4" / "medsi_output.jsonl", longer_lines)}
    model = tmp_path / "model_ouputs" / "AlpaCare-7b" / "medinstruct"
    model.mkdir(parents=True)
    answers = {"seed_0": [r["output"] + " More." for r in rows],  # beats refs_a, loses to refs_b
               "seed_1": [r["output"] + " More." * 100 if i % 2 else "Short." for i, r in enumerate(rows)]}
    for seed, outs in answers.items():
        (model / f"{seed}.json").write_text(json.dumps([{"id": i, "instruction": r["instruction"], "input": r["input"],
                                                         "response": o} for i, (r, o) in enumerate(zip(rows, outs))]))
    args = ["judge", "--outputs", str(model / "seed_0.json"), str(model / "seed_1.json"), "--reference",
            *map(str, refs.values()), "--annotations", "ann.jsonl", *FAST]
    r = run_cli(args, server, tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("winrate__AlpaCare-7b__vs__gpt-4__MedInstruct-test__*.json"))
    got = {(Path(s["model_outputs"]).stem, Path(s["reference_outputs"]).parts[-3], s["win_rate"])
           for s in map(lambda f: json.loads(f.read_text()), files)}
    assert got == {("seed_0", "refs_a", 100.0), ("seed_0", "refs_b", 0.0), ("seed_1", "refs_a", 50.0),
                   ("seed_1", "refs_b", 50.0)}
    assert sorted(line.rsplit(" -> ", 1)[1] for line in r.stdout.splitlines()) == [str(f.name) for f in files]
    assert server.stats()["billed"] == 4 * 2 * n
    r = run_cli(args, server, tmp_path)  # stable: the same four files, from the cache
    assert r.returncode == 0 and sorted(tmp_path.glob("winrate__*.json")) == files
    assert server.stats()["billed"] == 4 * 2 * n
    with pytest.raises(DataError, match="a second win rate of AlpaCare-7b vs gpt-4 on MedInstruct-test"):
        read_summaries(tmp_path)


def test_a_reference_that_no_outputs_file_answers_is_an_error(fake_server, tmp_path, alpacare_data, monkeypatch,
                                                              capsys):
    server = fake_server(judge=longer)
    n = 10
    medsi = write_reference(tmp_path / "gpt-4" / "medsi_output.jsonl",
                            reference_lines(alpacare_data, "gpt-4", "medsi_output.jsonl", n))
    icliniq = write_reference(tmp_path / "gpt-4" / "iCliniq_output.jsonl",
                              reference_lines(alpacare_data, "gpt-4", "iCliniq_output.jsonl", n))
    rows = [json.loads(line) for line in medsi.read_text().splitlines()]
    (tmp_path / "m.json").write_text(json.dumps([{"instruction": r["instruction"], "input": r["input"],
                                                  "output": r["output"] + " More.", "generator": "m"} for r in rows]))
    args = ["judge", "--outputs", "m.json", "--reference", str(medsi), str(icliniq), "--annotations", "ann.jsonl",
            *FAST]
    monkeypatch.chdir(tmp_path)
    for key, value in cli_env(server).items():
        monkeypatch.setenv(key, value)
    assert main(args) == 2  # before anything is sent
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {icliniq}: no outputs file answers this reference set (none of its {n} records is answered); "
        "pass --allow_missing to judge without it"]
    assert server.stats()["billed"] == 0
    r = run_cli([*args, "--allow_missing"], server, tmp_path)  # opted in: judged without it, still reported
    assert r.returncode == 0, r.stderr
    assert f"{icliniq}: no outputs file answers this reference set" in r.stderr
    assert read_summary(tmp_path, "m", "gpt-4", "MedInstruct-test")["win_rate"] == 100.0


def final_records(store: Path) -> dict[str, dict]:
    """The record each request id ends with in a superseding store (the last line of that id)."""
    return {rec["request_id"]: rec for rec in map(json.loads, store.read_text().splitlines())}


def max_tokens_asked(ledger: list[dict]) -> list[list[int]]:
    sizes: dict[str, list[int]] = {}
    for e in ledger:
        sizes.setdefault(e["request_id"], []).append(e["max_tokens"])
    return list(sizes.values())


def test_responses_cut_off_below_the_cap_are_asked_again(fake_server, tmp_path, seed_tasks):
    (tmp_path / "tasks.json").write_text(json.dumps(seed_tasks[:3]))
    base = ["responses", "--in", "tasks.json", *FAST]
    # more doublings than a fixed bound of rounds allowed (1 .. 1024): never stored as truncated below the cap
    cut = fake_server(truncate_all=True)
    r = run_cli([*base, "--out", "a.jsonl", "--max_tokens", "1", "--max_tokens_cap", "1024"], cut, tmp_path)
    assert r.returncode == 0, r.stderr
    assert max_tokens_asked(cut.ledger) == [[2 ** k for k in range(11)]] * 3
    final = final_records(tmp_path / "a.jsonl").values()
    assert [(x["truncated"], x["max_tokens"]) for x in final] == [(True, 1024)] * 3

    # answers cut off at a low cap are final for it; raising the cap asks them again, from twice the cut
    server = fake_server()
    low = [*base, "--out", "b.jsonl", "--export", "b.json", "--max_tokens", "8", "--max_tokens_cap", "16"]
    r = run_cli(low, server, tmp_path)
    assert r.returncode == 0 and '"exported": 0, "truncated_left_out": 3' in r.stderr, r.stderr
    billed = len(server.ledger)
    r = run_cli([*low[:-1], "128"], server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "b.json").read_text())) == 3
    assert all(sizes == [32, 64, 128][: len(sizes)] for sizes in max_tokens_asked(server.ledger[billed:]))

    # with the Batch API, each doubling is another batch round: nothing is left truncated below the cap
    batch = fake_server(batch_delay=0.05)
    r = run_cli([*base, "--out", "c.jsonl", "--export", "c.json", "--max_tokens", "8", "--max_tokens_cap", "128",
                 "--batch_api", "--batch_poll_seconds", "0.05"], batch, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "c.json").read_text())) == 3
    assert all(sizes == [8, 16, 32, 64, 128][: len(sizes)] and len(sizes) >= 3
               for sizes in max_tokens_asked(batch.ledger))
    assert len(batch.batches) == max(map(len, max_tokens_asked(batch.ledger)))
