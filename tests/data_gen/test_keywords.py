"""``keywords``: identifiers never become keywords, the privacy budget arithmetic, the input layouts, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data_gen.errors import DataError
from data_gen.identifiers import find_identifiers, mask
from data_gen.keywords import BudgetTotals, Question, extract, load_questions, make_extractor, select_keywords, words
from tests.data_gen.harness import REPO
from tests.data_gen.mcq_synthetic import IDENTIFIER_VIGNETTES as VIGNETTES
from tests.data_gen.mcq_synthetic import make_questions

pytest.importorskip("yake")

def _identifier_words(idents: list[str]) -> set[str]:
    return {w.lower() for i in idents for w in words(i)}


@pytest.mark.parametrize("text,planted", VIGNETTES)
def test_identifier_filter_masks_every_planted_identifier(text, planted):
    spans = find_identifiers(text)
    masked = mask(text, spans)
    for ident in planted:
        assert ident not in masked, ident
        for w in words(ident):
            if len(w) > 1:  # the words of the identifier are gone, not only the whole string
                assert w.lower() not in {x.lower() for x in words(masked)}, (ident, w, masked)


def test_identifier_filter_keeps_medical_words():
    text = ("Examination shows a resting tremor. Parkinson disease, Crohn's disease and Staphylococcus aureus "
            "infection are considered; HbA1c is 9.1% and the ECG is normal. He takes type 2 diabetes drugs.")
    masked = mask(text, find_identifiers(text))
    for kept in ["Examination", "Parkinson disease", "Crohn's disease", "Staphylococcus aureus", "HbA1c", "ECG",
                 "type 2 diabetes", "resting tremor"]:
        assert kept in masked, kept


def test_a_name_beside_an_eponym_is_masked_whole():
    text = "She was referred by Sarah Wilson for suspected Wilson disease."
    masked = mask(text, find_identifiers(text))
    assert "Sarah" not in masked and "Wilson disease" in masked and masked.count("Wilson") == 1


@pytest.mark.parametrize("extractor", ["default"])
def test_identifiers_never_become_keywords(extractor):
    ex = make_extractor(extractor)
    cases = [(t, p) for t, p in VIGNETTES] + [(q.question, q.identifiers) for q in make_questions(60, seed=3)]
    for text, planted in cases:
        rec = extract(Question("q", text, {"A": "x", "B": "y"}), ex)
        assert rec.keywords, text
        kw_words = {w.lower() for k in rec.keywords for w in words(k)}
        leaked = kw_words & _identifier_words(planted)
        assert not leaked, (leaked, rec.keywords)


def test_synthetic_findings_survive_extraction():
    """The e2e helper relies on it: the made-up finding of every synthetic question is a keyword's word."""
    ex = make_extractor("default")
    for q in make_questions(100, seed=5):
        rec = extract(Question(q.id, q.question, q.options, q.answer), ex)
        assert any(q.finding in k.split() for k in rec.keywords), (q.question, rec.keywords)


class FixedCandidates:
    """An extractor returning given candidates: isolates the selection and budget arithmetic."""

    def __init__(self, candidates):
        self.given = candidates

    def candidates(self, text, n_words):
        return list(self.given)


def test_privacy_budget_arithmetic():
    q = Question("q1", "A 45-year-old with Crohn's disease has bloody diarrhea and weight loss since June.",
                 {"A": "a", "B": "b"})
    assert words(q.question) == ["A", "45-year-old", "with", "Crohn's", "disease", "has", "bloody", "diarrhea",
                                 "and", "weight", "loss", "since", "June"]
    cands = ["Crohn's disease", "disease activity",  # shares 'disease': dropped
             "the bloody diarrhea",  # leading filler trimmed -> 2 words
             "45-year-old", "June",  # identifiers: dropped
             "weight loss", "loss"]  # 'loss' already used
    rec = extract(q, FixedCandidates(cands), max_share=1.0)
    assert rec.keywords == ["Crohn's disease", "bloody diarrhea", "weight loss"]
    assert (rec.words_total, rec.words_kept) == (13, 6)
    assert rec.to_dict()["privacy_budget"] == round(6 / 13, 4)
    capped = extract(q, FixedCandidates(cands), max_share=0.35)  # floor(0.35 * 13) = 4 words at most
    assert capped.keywords == ["Crohn's disease", "bloody diarrhea"] and capped.words_kept == 4

    other = Question("q2", " ".join(["word"] * 27) + " sepsis", {"A": "a", "B": "b"})
    rec2 = extract(other, FixedCandidates(["sepsis"]), max_share=1.0)
    assert (rec2.words_total, rec2.words_kept) == (28, 1)
    totals = BudgetTotals()
    totals.add(rec)
    totals.add(rec2)
    # Overall: words kept over words total (7/41), not the mean of the per-question shares.
    assert totals.privacy_budget == pytest.approx(7 / 41)
    assert totals.summary()["privacy_budget"] == round(7 / 41, 4)


def test_numbers_and_filler_are_not_keywords():
    got = select_keywords(["2021", "glucose 250 mg", "which of the", "hemoglobin A1c", "CD4 count"], set())
    assert got == ["hemoglobin A1c", "CD4 count"]


def test_released_layouts(tmp_path):
    rows = [
        {"id": "ours-1", "question": "Fever and neck stiffness?", "options": ["Meningitis", "Migraine"],
         "answer": "A"},
        {"question": "Which drug for absence seizures?", "answer": "Ethosuximide",  # MedQA (4 options)
         "options": {"A": "Phenytoin", "B": "Ethosuximide", "C": "Carbamazepine", "D": "Gabapentin"},
         "meta_info": "step1", "answer_idx": "B"},
        {"id": "mm-1", "question": "Vitamin deficient in scurvy?", "opa": "A", "opb": "B1", "opc": "C",
         "opd": "D", "cop": 3, "choice_type": "single", "subject_name": "Medicine"},  # MedMCQA
        {"qid": 7, "qtext": "The Tzanck test detects:", "ra": 2,  # HEAD-QA
         "answers": [{"aid": 1, "atext": "Bacteria"}, {"aid": 2, "atext": "Multinucleated giant cells"},
                     {"aid": 3, "atext": "Fungi"}, {"aid": 4, "atext": "Eosinophils"}]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs = load_questions(path)
    assert [q.answer for q in qs] == ["A", "B", "C", "B"]
    assert qs[0].options == {"A": "Meningitis", "B": "Migraine"}
    assert qs[1].id == "1" and qs[2].id == "mm-1" and qs[3].id == "7"
    assert qs[3].options["B"] == "Multinucleated giant cells"
    headqa = tmp_path / "HEAD_EN.json"  # the released HEAD-QA file: exams -> data
    headqa.write_text(json.dumps({"version": "1.0", "language": "en", "exams": {
        "Cuaderno_2013_1_B": {"name": "Cuaderno_2013_1_B", "category": "biology", "data": [rows[3]]}}}))
    assert load_questions(headqa)[0].answer == "B"


def test_ids_agree_with_the_multiple_choice_readers(tmp_path):
    """Contexts are joined on the ids the trainer's readers give: the same file must get the same ids here."""
    from alpacare_jax.data.multiple_choice import read_questions

    medqa = tmp_path / "medqa.jsonl"  # no ids: 0-based line numbers, blank lines counted
    rows = [{"question": f"Which drug {k}?", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer_idx": "C",
             "answer": "z"} for k in range(3)]
    medqa.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    medmcqa = tmp_path / "medmcqa.jsonl"  # its own ids
    medmcqa.write_text("".join(json.dumps({"id": f"e{k}", "question": f"Vitamin {k}?", "opa": "A", "opb": "B1",
                                           "opc": "C", "opd": "D", "cop": 2}) + "\n" for k in range(2)))
    headqa = tmp_path / "HEAD_EN.json"  # qids repeat across exams: EXAM/qid
    q = {"qid": 1, "qtext": "The Tzanck test detects:", "ra": 2,
         "answers": [{"aid": 1, "atext": "Bacteria"}, {"aid": 2, "atext": "Giant cells"}]}
    headqa.write_text(json.dumps({"exams": {"Cuaderno_2013_1_B": {"data": [q, {**q, "qid": 2}]},
                                            "Cuaderno_2014_1_M": {"data": [q]}}}))
    for path, fmt in [(medqa, "medqa"), (medmcqa, "medmcqa"), (headqa, "headqa")]:
        ours = [(x.id, x.answer) for x in load_questions(path)]
        theirs = [(x.id, "ABCD"[x.answer]) for x in read_questions(path, fmt)]
        assert ours == theirs, fmt
    assert [x.id for x in load_questions(medqa)] == ["0", "2", "3"]
    assert [x.id for x in load_questions(headqa)] == ["Cuaderno_2013_1_B/1", "Cuaderno_2013_1_B/2",
                                                      "Cuaderno_2014_1_M/1"]


@pytest.mark.parametrize("row,field", [
    ({"id": "a", "question": "", "options": ["x", "y"]}, "question"),
    ({"id": "a", "question": "q?", "options": {"A": "x"}}, "options"),
    ({"id": "a", "question": "q?", "options": {"A": "x", "B": 3}}, "options.B"),
    ({"id": "a", "question": "q?", "options": ["x", "y"], "answer": "C"}, "answer"),
    ({"id": "a", "question": "q?", "opa": "x", "opb": "y", "cop": 0}, "cop"),
])
def test_bad_records_name_file_record_field(tmp_path, row, field):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "ok", "question": "q?", "options": ["x", "y"]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        load_questions(path)
    assert f"{path}, record 1, field {field!r}" in str(e.value)


def test_cli_keywords(tmp_path):
    qs = make_questions(30, seed=7)
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q.record()) + "\n" for q in qs))
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENAI_BASE_URL="http://127.0.0.1:9/v1")  # nothing listens
    r = subprocess.run([sys.executable, "-m", "data_gen", "keywords", "--in", "q.jsonl", "--out", "kw.jsonl",
                        "--no_progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (tmp_path / "kw.jsonl").read_text().splitlines()]
    assert [x["id"] for x in recs] == [q.id for q in qs]
    for rec, q in zip(recs, qs):
        assert set(rec) == {"id", "keywords", "options", "answer", "words_total", "words_kept", "privacy_budget"}
        assert rec["options"] == q.options and rec["answer"] == q.answer
        assert rec["words_kept"] == sum(len(words(k)) for k in rec["keywords"]) <= 0.45 * rec["words_total"]
        assert rec["privacy_budget"] == round(rec["words_kept"] / rec["words_total"], 4)
    overall = json.loads(r.stderr.strip().splitlines()[-1])
    assert overall["words_kept"] == sum(x["words_kept"] for x in recs)
    assert overall["privacy_budget"] == round(overall["words_kept"] / overall["words_total"], 4)
    assert "privacy budget" in r.stderr

    (tmp_path / "bad.jsonl").write_text('{"id": "x", "question": "q?", "options": ["a"]}\n')
    r = subprocess.run([sys.executable, "-m", "data_gen", "keywords", "--in", "bad.jsonl", "--out", "kw2.jsonl"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bad.jsonl, record 0, field 'options'" in r.stderr
    assert not (tmp_path / "kw2.jsonl").exists()


def test_scispacy_extractor():
    spacy = pytest.importorskip("spacy")
    try:
        spacy.load("en_core_sci_sm")
    except OSError:
        pytest.skip("scispaCy model en_core_sci_sm not installed")
    ex = make_extractor("scispacy")
    text, planted = VIGNETTES[0]
    rec = extract(Question("q", text, {"A": "x", "B": "y"}), ex)
    assert rec.keywords and not ({w.lower() for k in rec.keywords for w in words(k)} & _identifier_words(planted))
