"""responses (truncation, format, bad input), judge (schemas, matching, parsing, win rate, cache) and --batch_api."""

from __future__ import annotations

import json
import math

import pytest

from data_gen.errors import DataError
from data_gen.judge import build_comparisons, match_examples, parse_verdict, win_rate
from data_gen.outputs import Example, load_outputs
from tests.data_gen.harness import FAST, kill_while_batch_runs, read_summary, rerun_polling_the_held_batch, run_cli

MODELS = ("claude-2", "gpt-3.5-turbo", "gpt-4", "text-davinci-003")


def write_tasks(path, seed_tasks, n):
    path.write_text(json.dumps(seed_tasks[:n]))


def test_truncated_answers_retried_then_flagged(fake_server, tmp_path, seed_tasks):
    server = fake_server()
    write_tasks(tmp_path / "tasks.json", seed_tasks, 12)
    # answers are 28-70 words: 8 tokens truncates all; doubling up to 16 still truncates all
    r = run_cli(["responses", "--in", "tasks.json", "--out", "a.jsonl", "--export", "a.json", "--max_tokens", "8",
                 "--max_tokens_cap", "16", *FAST], server, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").open()]
    recs = {x["request_id"]: x for x in lines}.values()  # each attempt is stored, the last one stands
    assert sorted(x["max_tokens"] for x in lines) == [8] * 12 + [16] * 12
    assert len(recs) == 12 and all(x["truncated"] and x["finish_reason"] == "length" for x in recs)
    assert json.loads((tmp_path / "a.json").read_text()) == []  # never silently kept
    assert '"truncated_left_out": 12' in r.stderr
    assert server.stats()["billed"] == 24  # one retry each, with more tokens
    # with room to grow, every answer completes
    r = run_cli(["responses", "--in", "tasks.json", "--out", "b.jsonl", "--export", "b.json", "--max_tokens", "20",
                 *FAST], server, tmp_path)
    data = json.loads((tmp_path / "b.json").read_text())
    assert len(data) == 12 and all(d["output"].endswith(".") for d in data)
    assert [set(d) for d in data] == [{"instruction", "input", "output", "type", "topic", "view", "difficulty"}] * 12
    assert [d["difficulty"] for d in data] == [t["difficulty"] for t in seed_tasks[:12]]


def test_bad_input_names_file_record_field(fake_server, tmp_path, seed_tasks):
    tasks = [dict(t) for t in seed_tasks[:5]]
    tasks[3]["instruction"] = ""
    (tmp_path / "bad.json").write_text(json.dumps(tasks))
    (tmp_path / "out.jsonl").write_text('{"request_id": "resp-keep", "output": "kept"}\n')
    r = run_cli(["responses", "--in", "bad.json", "--out", "out.jsonl", *FAST], fake_server(), tmp_path)
    assert r.returncode == 2 and "bad.json, record 3, field 'instruction': missing, empty" in r.stderr
    assert (tmp_path / "out.jsonl").read_text() == '{"request_id": "resp-keep", "output": "kept"}\n'
    (tmp_path / "seeds.json").write_text(json.dumps([{"instruction": "x"}]))
    r = run_cli(["instructions", "--seeds", "seeds.json", "--out", "o.jsonl", "--num_requests", "1", *FAST],
                fake_server(), tmp_path)
    assert r.returncode == 2 and "seeds.json, record 0, field 'topic': missing" in r.stderr


def test_reads_every_alpacare_reference_file(alpacare_data):
    refs = alpacare_data / "reference_outputs"
    for test_set, n in (("iCliniq_output.jsonl", 1000), ("medsi_output.jsonl", 216)):
        loaded = {m: load_outputs(refs / m / test_set) for m in MODELS}
        for m, ex in loaded.items():
            assert len(ex) == n and all(e.output.strip() for e in ex), m
        # claude-2's iCliniq file has only a Human/Assistant prompt: it still matches gpt-4's records
        matching = match_examples(loaded["claude-2"], loaded["gpt-4"])
        pairs = matching.pairs
        assert not matching.unmatched and not matching.missing
        assert [a.index for a, b in pairs] == [b.index for a, b in pairs] == list(range(n))
    test = load_outputs(alpacare_data / "MedInstruct-test.jsonl", "gpt-4-answer")
    assert len(test) == 216 and test[5].id == "5"
    with pytest.raises(DataError, match=r"MedInstruct-test.jsonl, record 0, field 'output'"):
        load_outputs(alpacare_data / "MedInstruct-test.jsonl")


def test_matching_by_text_then_id_and_clear_error(alpacare_data, tmp_path):
    ref_path = alpacare_data / "reference_outputs" / "gpt-4" / "medsi_output.jsonl"
    ref = load_outputs(ref_path)
    rows = [{"id": i, "instruction": "  " + e.instruction.upper() + " ", "input": "", "output": "x",
             "generator": "m"} for i, e in enumerate(ref)][::-1]  # other order, case and spacing
    rows[0] = {**rows[0], "instruction": "You are a doctor. " + ref[rows[0]["id"]].instruction}  # extra header
    (tmp_path / "m.json").write_text(json.dumps(rows))
    matching = match_examples(load_outputs(tmp_path / "m.json"), ref)
    assert all(int(m.id) == r.index for m, r in matching.pairs) and len(matching.pairs) == len(ref)
    rows[7] = {**rows[7], "id": "x", "instruction": "Something never asked"}
    (tmp_path / "m.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"m.json, record 7, field 'instruction': matches no"):
        build_comparisons([tmp_path / "m.json"], [ref_path])


def test_matching_by_contained_text_without_ids(alpacare_data):
    """AlpaCare's iCliniq outputs put a fixed header in the instruction and the question in the input."""
    ref = load_outputs(alpacare_data / "reference_outputs" / "gpt-4" / "iCliniq_output.jsonl")
    header = "If you are a doctor, please answer the medical questions based on the patient's description."
    model = [Example(instruction=header, input=r.input, output="x", index=i) for i, r in enumerate(ref[::-1])]
    matching = match_examples(model[:-3], ref)
    assert not matching.unmatched and [r.index for r in matching.missing] == [0, 1, 2]
    assert all(m.input == r.input for m, r in matching.pairs) and len(matching.pairs) == len(ref) - 3


@pytest.mark.parametrize("text,expected", [
    ("Output (a)", "a"), ("Output (b)", "b"), ("Tie", "tie"), ("**Output (b)**", "b"), ("output b.", "b"),
    ("(a)", "a"), ("Verdict: b", "b"), ("Output (a)\n\nOutput (a) is more accurate than Output (b).", "a"),
    ("Both are equally good.", "tie"), ("Output (a) or Output (b), hard to say", None), ("I cannot decide", None),
    ("", None), ("After careful review: Output (b) is better.", "b"),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_win_rate_math():
    ann = [{"example": 0, "order": "model_first", "verdict": "a"},      # win
           {"example": 0, "order": "reference_first", "verdict": "b"},  # win
           {"example": 1, "order": "model_first", "verdict": "b"},      # loss
           {"example": 1, "order": "reference_first", "verdict": "tie"},
           {"example": 2, "order": "model_first", "verdict": "tie"},
           {"example": 2, "order": "reference_first", "verdict": None}]
    wr = win_rate(ann)
    means = [1.0, 0.25, 0.5]
    mu = sum(means) / 3
    assert wr.win_rate == pytest.approx(100 * mu)
    assert wr.stderr == pytest.approx(100 * math.sqrt(sum((x - mu) ** 2 for x in means) / 2) / math.sqrt(3))
    assert (wr.wins, wr.ties, wr.losses, wr.n_unparseable, wr.n_examples, wr.n_truncated) == (2, 2, 1, 1, 3, 0)


def test_judge_end_to_end_with_cache(fake_server, tmp_path, alpacare_data):
    server = fake_server()
    refs = alpacare_data / "reference_outputs"
    gpt4 = [json.loads(line) for line in (refs / "gpt-4" / "medsi_output.jsonl").open()]
    # a model that is longer than gpt-4 on even examples, shorter on odd ones: the fake judge prefers longer
    outs = [{"id": i, "instruction": r["instruction"], "input": r["input"], "generator": "alpacare-tiny",
             "output": r["output"] + " More detail." if i % 2 == 0 else r["output"][: len(r["output"]) // 2]}
            for i, r in enumerate(gpt4)]
    (tmp_path / "model.json").write_text(json.dumps(outs))
    args = ["judge", "--outputs", "model.json", "--reference", str(refs / "gpt-4" / "medsi_output.jsonl"),
            str(refs / "claude-2" / "medsi_output.jsonl"), "--annotations", "ann/cache.jsonl", "--concurrency", "32",
            *FAST]
    r = run_cli(args, server, tmp_path)
    assert r.returncode == 0, r.stderr
    billed = server.stats()["billed"]
    assert billed == 2 * 2 * 216
    s = read_summary(tmp_path / "ann", "alpacare-tiny", "gpt-4", "MedInstruct-test")
    assert (s["model"], s["reference_model"], s["test_set"]) == ("alpacare-tiny", "gpt-4", "MedInstruct-test")
    assert s["win_rate"] == pytest.approx(50.0) and s["n_examples"] == 216 and s["n_unparseable"] == 0
    assert s["complete"] and s["stderr"] == pytest.approx(100 * 0.5 / math.sqrt(216) * math.sqrt(216 / 215))
    assert read_summary(tmp_path / "ann", "alpacare-tiny", "claude-2", "MedInstruct-test")["n_examples"] == 216
    # rerun: everything comes from the annotation cache, nothing is billed
    r = run_cli(args, server, tmp_path)
    assert r.returncode == 0 and server.stats()["billed"] == billed
    assert "win rate 50.0" in r.stdout


def test_batch_api_resumes_by_stored_batch_ids(fake_server, tmp_path, seed_tasks):
    server = fake_server(batch_delay=0.05, hold_batches=True)
    write_tasks(tmp_path / "tasks.json", seed_tasks, 30)
    args = ["responses", "--in", "tasks.json", "--out", "b.jsonl", "--export", "b.json", "--batch_api",
            "--batch_poll_seconds", "0.1", *FAST]
    state = tmp_path / "b.jsonl.batches.json"
    kill_while_batch_runs(args, server, tmp_path, state)  # killed while the batch is running
    assert len(json.loads(state.read_text())["batches"]) == 1
    r = rerun_polling_the_held_batch(args, server, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(server.batches) == 1  # the rerun polled the stored batch instead of submitting again
    assert len(json.loads((tmp_path / "b.json").read_text())) == 30
    assert server.stats()["billed"] == 30
    assert "$0.0" in r.stderr
    r = run_cli(args, server, tmp_path)  # nothing left to do
    assert r.returncode == 0 and len(server.batches) == 1 and "0 new, 30 already done" in r.stderr


def test_batch_api_for_instructions_and_judge(fake_server, tmp_path, alpacare_data):
    server = fake_server(batch_delay=0.05)
    r = run_cli(["instructions", "--seeds", str(alpacare_data / "med_seed.json"), "--out", "raw.jsonl",
                 "--num_requests", "6", "--tasks_per_request", "4", "--batch_api", "--batch_poll_seconds", "0.05",
                 *FAST], server, tmp_path)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (tmp_path / "raw.jsonl").open()]
    assert len(recs) == 6 and sum(len(x["tasks"]) for x in recs) == 24
    ref = alpacare_data / "reference_outputs" / "text-davinci-003" / "iCliniq_output.jsonl"
    rows = [{"id": i, "instruction": "", "input": json.loads(line)["input"], "output": "Please see a doctor.",
             "generator": "m"} for i, line in enumerate(ref.open()) if i < 10]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    full_ref = tmp_path / "iCliniq_output.jsonl"  # the first 10 reference records
    full_ref.write_text("".join(line for i, line in enumerate(ref.open()) if i < 10))
    r = run_cli(["judge", "--outputs", "m.json", "--reference", str(full_ref), "--reference_name", "text-davinci-003",
                 "--annotations", "ann.jsonl", "--batch_api", "--batch_poll_seconds", "0.05", *FAST], server, tmp_path)
    assert r.returncode == 0, r.stderr
    s = read_summary(tmp_path, "m", "text-davinci-003", "iCliniq")
    assert s["n_judgements"] == 20 and s["win_rate"] == 0.0  # the short answer always loses
    assert len(server.batches) == 2
