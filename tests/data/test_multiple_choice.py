"""Multiple-choice readers (released MedQA / HEAD-QA / MedMCQA layouts), contexts, encoding and batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alpacare_jax.data import multiple_choice as mc
from alpacare_jax.train.config import base_config

MEDQA = [  # as in MedQA's US/4_options JSONL
    {"question": "A 23-year-old woman has dysuria. Which drug is best?", "answer": "Nitrofurantoin",
     "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"},
     "meta_info": "step2&3", "answer_idx": "D", "metamap_phrases": ["woman", "dysuria"]},
    {"question": "Which vitamin deficiency causes scurvy?", "answer": "Vitamin C",
     "options": {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D", "D": "Vitamin K"},
     "meta_info": "step1", "answer_idx": "B"},
]
HEADQA = {"version": "1.0", "language": "en", "exams": {
    "Cuaderno_2013_1_B": {"name": "Cuaderno_2013_1_B", "year": "2013", "category": "biology", "data": [
        {"qid": 1, "qtext": "Which organelle makes ATP?", "ra": 3, "image": "", "answers": [
            {"aid": 1, "atext": "Ribosome"}, {"aid": 2, "atext": "Golgi"}, {"aid": 3, "atext": "Mitochondrion"},
            {"aid": 4, "atext": "Lysosome"}, {"aid": 5, "atext": "Nucleolus"}]},
    ]},
    "Cuaderno_2014_1_M": {"name": "Cuaderno_2014_1_M", "year": "2014", "category": "medicine", "data": [
        {"qid": 7, "qtext": "First-line drug for anaphylaxis?", "ra": 1, "image": "", "answers": [
            {"aid": 1, "atext": "Adrenaline"}, {"aid": 2, "atext": "Atropine"}, {"aid": 3, "atext": "Ondansetron"},
            {"aid": 4, "atext": "Loratadine"}]},
    ]},
}}
MEDMCQA = [  # as in MedMCQA's train.json / dev.json (one JSON object per line)
    {"question": "Which nerve supplies the deltoid?", "exp": "The axillary nerve.", "cop": 3, "opa": "Radial",
     "opb": "Median", "opc": "Axillary", "opd": "Ulnar", "subject_name": "Anatomy", "topic_name": "Upper limb",
     "id": "e9ad821a-c438-4965-9f77-760819dfa155", "choice_type": "single"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_medqa_reader(tmp_path):
    questions = mc.read_questions(write_jsonl(tmp_path / "train.jsonl", MEDQA), "medqa")
    assert [q.id for q in questions] == ["0", "1"]  # no `id` field: the line number
    assert questions[0].options == ("Ampicillin", "Ceftriaxone", "Doxycycline", "Nitrofurantoin")
    assert [q.answer for q in questions] == [3, 1]


def test_headqa_reader(tmp_path):
    path = tmp_path / "train_HEAD_EN.json"
    path.write_text(json.dumps(HEADQA))
    questions = mc.read_questions(path, "headqa")
    assert [q.id for q in questions] == ["Cuaderno_2013_1_B/1", "Cuaderno_2014_1_M/7"]
    assert len(questions[0].options) == 5 and questions[0].options[questions[0].answer] == "Mitochondrion"
    assert questions[1].answer == 0


def test_medmcqa_reader(tmp_path):
    (question,) = mc.read_questions(write_jsonl(tmp_path / "dev.json", MEDMCQA), "medmcqa")
    assert question.id == MEDMCQA[0]["id"]
    assert question.options[question.answer] == "Axillary"


@pytest.mark.parametrize("fmt, records, edit, message", [
    ("medqa", MEDQA, lambda r: r[1].pop("answer_idx"), r"line 2: missing field 'answer_idx'"),
    ("medqa", MEDQA, lambda r: r[0].update(answer_idx="E"), r"line 1: field 'answer_idx' is 'E'"),
    ("medqa", MEDQA, lambda r: r[1]["options"].pop("B"), r"line 2: field 'options' must have keys A, B"),
    ("medmcqa", MEDMCQA, lambda r: r[0].update(cop=0), r"line 1: field 'cop' is 0"),
    ("medmcqa", MEDMCQA, lambda r: r[0].update(opb=""), r"line 1: field 'opb' must be a non-empty string"),
])
def test_bad_records_are_named(tmp_path, fmt, records, edit, message):
    records = json.loads(json.dumps(records))
    edit(records)
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(mc.DataError, match=f"{path}: {message}"):
        mc.read_questions(path, fmt)


def test_bad_headqa_and_bad_json_are_named(tmp_path):
    content = json.loads(json.dumps(HEADQA))
    content["exams"]["Cuaderno_2014_1_M"]["data"][0]["ra"] = 9
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(mc.DataError, match=r"exam 'Cuaderno_2014_1_M' qid 7: field 'ra' is 9"):
        mc.read_questions(path, "headqa")
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(MEDQA[0]) + "\n{not json\n")
    with pytest.raises(mc.DataError, match=rf"{path}: line 2: not JSON"):
        mc.read_questions(path, "medqa")


def contexts_for(questions, skip=()):
    return [{"id": q.id, "overall_context": f"Overall {q.id}.", "preliminary_answer": "A", "model": "m",
             "option_contexts": {letter: f"Context {q.id}{letter}." for letter in "ABCD"[:len(q.options)]}}
            for q in questions if q.id not in skip]


def test_contexts_are_joined_by_id(tmp_path):
    questions = mc.read_questions(write_jsonl(tmp_path / "q.jsonl", MEDQA), "medqa")
    path = write_jsonl(tmp_path / "contexts.jsonl", contexts_for(questions)[::-1])  # any order
    joined = mc.attach_contexts(questions, mc.read_contexts(path), str(path))
    assert joined[1].overall_context == "Overall 1." and joined[1].option_contexts[2] == "Context 1C."

    missing = write_jsonl(tmp_path / "partial.jsonl", contexts_for(questions, skip={"1"}))
    with pytest.raises(mc.DataError, match=rf"{missing}: no context for question id '1' \(1 of 2"):
        mc.attach_contexts(questions, mc.read_contexts(missing), str(missing))
    records = contexts_for(questions)
    del records[0]["option_contexts"]["D"]
    short = write_jsonl(tmp_path / "short.jsonl", records)
    with pytest.raises(mc.DataError, match=r"id '0': field 'option_contexts' has no text for option D"):
        mc.attach_contexts(questions, mc.read_contexts(short), str(short))
    records = contexts_for(questions)
    records[1]["overall_context"] = None
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(mc.DataError, match=rf"{bad}: line 2: field 'overall_context'"):
        mc.read_contexts(bad)


def test_few_shot_subsets_are_seeded_and_kept_in_file_order():
    questions = [mc.Question(str(i), "q", ("a", "b"), 0) for i in range(1000)]
    splits = [mc.subset(questions, 100, seed) for seed in range(3)]
    assert all(len(s) == 100 for s in splits)
    assert all([int(q.id) for q in s] == sorted(int(q.id) for q in s) for s in splits)
    assert len({tuple(q.id for q in s) for s in splits}) == 3
    assert mc.subset(questions, 100, 1) == splits[1]
    assert mc.subset(questions, 0, 0) == questions


def test_encoding_layout_and_longest_first_truncation(sp_tokenizer):
    question = mc.Question("7", "Which drug? " * 3, ("Aspirin", "Heparin", "Insulin"), 2, "Overall.",
                           ("Ctx A.", "Ctx B.", "Ctx C."))
    out = mc.QuestionEncoder(sp_tokenizer, 64, num_options=4)(question)
    assert out["input_ids"].shape == (4, 64) and out["lengths"][3] == 0 and int(out["label"]) == 2
    row = out["input_ids"][1, :out["lengths"][1]]
    assert row[0] == sp_tokenizer.bos_id
    # The two parts are tokenized apart (their boundary is exact), so sentencepiece's word-start mark
    # on the second part decodes as a space.
    expected = "Question: " + "Which drug? " * 3 + "\n Answer: Heparin\nContext: Overall.\nCtx B."
    assert sp_tokenizer.decode(row[1:]) == expected
    assert (out["input_ids"][1, out["lengths"][1]:] == sp_tokenizer.pad_id).all()

    first, second = list(range(50)), list(range(100, 110))
    assert mc.truncate_pair(first, second, 30) == (first[:20], second)  # the longer part is cut
    assert mc.truncate_pair(first[:12], second, 20) == (first[:10], second)
    assert mc.truncate_pair(first[:5], second, 20) == (first[:5], second)
    long = mc.Question("8", "very long question " * 100, ("A short option",), 0)
    (length,) = mc.QuestionEncoder(sp_tokenizer, 48, num_options=1)(long)["lengths"]
    assert length == 48


def _config(tmp_path, **mc_fields):
    config = base_config()
    config.objective = "multiple_choice"
    config.data.update(max_length=64, global_batch_size=2, read_threads=0)
    config.multiple_choice.update(mc_fields)
    return config


def test_train_iterator_resumes_and_eval_covers_every_question_once(tmp_path, sp_tokenizer):
    questions = [mc.Question(str(i), f"Question {i}?", ("yes", "no", "maybe"), i % 3) for i in range(7)]
    config = _config(tmp_path, num_options=3)
    it = mc.make_train_iterator(config, sp_tokenizer, questions=questions)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (3 batches of 2 per epoch)
    again = mc.make_train_iterator(config, sp_tokenizer, questions=questions)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert set(got) == set(mc.BATCH_KEYS)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])

    batches = list(mc.make_eval_iterator(config, sp_tokenizer, questions=questions))
    assert len(batches) == 4 and batches[0]["input_ids"].shape == (2, 3, 64)
    weights = np.concatenate([b["weight"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert weights.tolist() == [1] * 7 + [0] and labels[:7].tolist() == [q.answer for q in questions]


def test_load_split_applies_subset_and_checks_num_options(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", MEDQA * 3)
    config = _config(tmp_path, train_file=str(path), eval_file=str(path), train_size=4, subset_seed=1)
    assert len(mc.load_split(config.multiple_choice, "train")) == 4
    assert len(mc.load_split(config.multiple_choice, "eval")) == 6
    config.multiple_choice.num_options = 3
    with pytest.raises(mc.DataError, match="more options than multiple_choice.num_options=3"):
        mc.load_split(config.multiple_choice, "eval")


def test_test_split_has_its_own_files_and_eval_iterator(tmp_path, sp_tokenizer):
    dev = write_jsonl(tmp_path / "dev.jsonl", MEDQA)
    test = write_jsonl(tmp_path / "test.jsonl", MEDQA[::-1] * 2)  # another file: 4 questions, labels 1, 3, 1, 3
    contexts = write_jsonl(tmp_path / "test_contexts.jsonl", [
        {"id": str(i), "overall_context": f"overall {i}", "option_contexts": {k: f"{k}{i}" for k in "ABCD"}}
        for i in range(4)])
    config = _config(tmp_path, eval_file=str(dev), test_file=str(test), test_contexts_file=str(contexts))
    questions = mc.load_split(config.multiple_choice, "test")
    assert [q.answer for q in questions] == [1, 3, 1, 3] and questions[2].option_contexts == ("A2", "B2", "C2", "D2")
    assert mc.load_split(config.multiple_choice, "eval")[0].option_contexts == ()  # dev has no contexts file
    labels = np.concatenate([b["label"] for b in mc.make_eval_iterator(config, sp_tokenizer, split="test")])
    assert labels.tolist() == [1, 3, 1, 3]
    with pytest.raises(ValueError, match="split 'dev'; choose one of"):
        mc.load_split(config.multiple_choice, "dev")
