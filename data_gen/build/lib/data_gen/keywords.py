"""``keywords``: medical keywords of multiple-choice questions, extracted locally (no network).

Only the keywords and the answer options of a question ever leave the machine (``contexts``
sends them to an LLM); the question text does not. Identifiers are masked before extraction
(``identifiers.find_identifiers``) and any keyword still touching one is dropped, so ages,
dates, names, places and record numbers never become keywords.

Keywords never share a word (the better-scored keyword wins), so ``words_kept``, the number
of words in the keywords, counts each question word sent at most once. The privacy budget
is ``words_kept / words_total``: the share of the question's words that leaves the machine
(the paper reports about 42%). Overall budget: total kept over total words.

Extractors: ``default`` is YAKE (statistical, installs from PyPI, no model download);
``scispacy`` uses the entities of a scispaCy model, the paper's choice, when installed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from .errors import DataError
from .identifiers import find_identifiers, mask
from .store import check_input_file, read_jsonl_numbered, read_records

log = logging.getLogger(__name__)

WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")  # "45-year-old" and "Crohn's" are one word each
LETTERS = "ABCDEFGHIJ"


def words(text: str) -> list[str]:
    """The words of ``text`` as the privacy budget counts them."""
    return WORD.findall(text)


# ----------------------------------------------------------------------------------------------- questions

@dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: dict[str, str]  # letter -> text, in order
    answer: str | None = None


def _options_from_list(items: Sequence, path, i: int, fld: str) -> dict[str, str]:
    if len(items) > len(LETTERS):
        raise DataError(path, i, fld, f"{len(items)} options; at most {len(LETTERS)} are supported")
    return {LETTERS[k]: v for k, v in enumerate(items)}


def _parse_question(rec: dict, path, i: int) -> Question:
    """One record in any supported layout -> ``Question``; problems name file, record and field."""
    if "qtext" in rec:  # HEAD-QA: {"qid", "qtext", "ra", "answers": [{"aid", "atext"}]}
        text, fld = rec["qtext"], "qtext"
        answers = rec.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, dict) and "atext" in a for a in answers):
            raise DataError(path, i, "answers", "expected a list of {aid, atext}")
        by_aid = {int(a.get("aid", k + 1)): a["atext"] for k, a in enumerate(answers)}
        options = {LETTERS[aid - 1]: by_aid[aid] for aid in sorted(by_aid)}
        ra = rec.get("ra")
        answer = LETTERS[int(ra) - 1] if ra not in (None, "", -1) else None
        qid = rec.get("qid", rec.get("id"))
    elif "opa" in rec:  # MedMCQA: {"id", "question", "opa".."opd", "cop" (1-4 in the released files)}
        text, fld = rec.get("question"), "question"
        options = {}
        for k, key in enumerate(("opa", "opb", "opc", "opd", "ope")):
            if key in rec:
                options[LETTERS[k]] = rec[key]
        cop = rec.get("cop")
        if cop in (None, "", -1):
            answer = None
        elif isinstance(cop, int) and 1 <= cop <= len(options):
            answer = LETTERS[cop - 1]
        else:
            raise DataError(path, i, "cop", f"expected 1..{len(options)} (released MedMCQA numbering), got {cop!r}")
        qid = rec.get("id")
    else:  # ours and MedQA: {"question", "options": {A: ..} or [..], "answer" or "answer_idx"}
        text, fld = rec.get("question"), "question"
        opts = rec.get("options")
        if isinstance(opts, list):
            options = _options_from_list(opts, path, i, "options")
        elif isinstance(opts, dict):
            options = {str(k): v for k, v in opts.items()}
        else:
            raise DataError(path, i, "options", "missing; expected a {letter: text} object or a list")
        answer = rec.get("answer_idx", rec.get("answer"))
        if answer is not None and answer not in options:
            by_text = [k for k, v in options.items() if v == answer]  # MedQA's "answer" is the option text
            if "answer_idx" in rec or len(by_text) != 1:
                raise DataError(path, i, "answer_idx" if "answer_idx" in rec else "answer",
                                f"{answer!r} is not one of the options {list(options)}")
            answer = by_text[0]
        qid = rec.get("id")
    if not isinstance(text, str) or not text.strip():
        raise DataError(path, i, fld, "missing, empty or not a string")
    if len(options) < 2:
        raise DataError(path, i, "options", "fewer than 2 options")
    for k, v in options.items():
        if not isinstance(v, str) or not v.strip():
            raise DataError(path, i, f"options.{k}", "missing, empty or not a string")
    if qid is not None and not isinstance(qid, (str, int)):
        raise DataError(path, i, "id", f"expected a string, got {type(qid).__name__}")
    return Question(id="" if qid is None else str(qid), question=text, options=options, answer=answer)


def _records(path: Path) -> list[tuple[dict, str, bool]]:
    """``(record, position id, position id wins)`` of every record of a JSONL/JSON file.

    The position id is what the multiple-choice readers of ``alpacare_jax`` join contexts on when a
    record has no ``id``: the 0-based line number of a JSONL file (MedQA), the index in a JSON list.
    A HEAD-QA release file (``{"exams": {name: {"data": [...]}}}``) is flattened and its questions
    are always ``EXAM/qid`` (qids repeat across exams), whatever else they carry.
    """
    if path.exists() and path.read_bytes()[:64].lstrip().startswith(b"{") and path.suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(doc, dict) and isinstance(doc.get("exams"), dict):
            return [(q, f"{name}/{q.get('qid') if isinstance(q, dict) else None}", True)
                    for name, exam in doc["exams"].items() for q in exam.get("data", [])]
    if check_input_file(path).read_bytes()[:64].lstrip().startswith(b"["):
        return [(rec, str(i), False) for i, rec in enumerate(read_records(path))]
    return [(rec, str(line), False) for line, rec in read_jsonl_numbered(path)]


def load_questions(path: str | Path) -> list[Question]:
    """Read multiple-choice questions in our layout, MedQA, MedMCQA or HEAD-QA (English) release layouts.

    Ids are the ones the multiple-choice readers of ``alpacare_jax`` give the same file, so the
    contexts made from these questions join back onto them: the record's ``id`` when present,
    ``EXAM/qid`` for HEAD-QA, else the 0-based line number.
    """
    path = Path(path)
    out, seen = [], {}
    for i, (rec, position_id, position_wins) in enumerate(_records(path)):
        q = _parse_question(rec, path, i)
        if position_wins or not q.id:
            q = Question(position_id, q.question, q.options, q.answer)
        if q.id in seen:
            raise DataError(path, i, "id", f"duplicate id {q.id!r} (first at record {seen[q.id]})")
        seen[q.id] = i
        out.append(q)
    if not out:
        raise DataError(path, None, None, "no questions")
    return out


# ----------------------------------------------------------------------------------------------- extractors

class Extractor(Protocol):
    """Ranked keyword candidates (best first) of a text whose identifiers are already masked."""

    def candidates(self, text: str, n_words: int) -> list[str]: ...


class YakeExtractor:
    """YAKE: unsupervised, statistical, no model to download (``pip install alpacare-data-gen[keywords]``)."""

    def __init__(self, max_ngram: int = 3):
        try:
            import yake
        except ImportError:
            raise SystemExit("the default keyword extractor needs YAKE: pip install 'yake>=0.4'") from None
        self._yake = yake
        self.max_ngram = max_ngram

    def candidates(self, text: str, n_words: int) -> list[str]:
        # Every candidate, ranked: ``select_keywords`` decides how many to keep.
        kw = self._yake.KeywordExtractor(lan="en", n=self.max_ngram, top=max(10, 2 * n_words))
        return [k for k, _score in kw.extract_keywords(text)]


class ScispacyExtractor:
    """Entities of a scispaCy model (the paper's extractor), in text order."""

    def __init__(self, model: str = "en_core_sci_sm"):
        try:
            import spacy
            self._nlp = spacy.load(model)
        except (ImportError, OSError) as e:
            raise SystemExit(f"the scispacy extractor needs spaCy and the model {model!r} installed ({e})") from None

    def candidates(self, text: str, n_words: int) -> list[str]:
        return [ent.text for ent in self._nlp(text).ents]


def make_extractor(name: str, spacy_model: str = "en_core_sci_sm") -> Extractor:
    if name == "default":
        return YakeExtractor()
    if name == "scispacy":
        return ScispacyExtractor(spacy_model)
    raise ValueError(f"unknown extractor {name!r}")


# ----------------------------------------------------------------------------------------------- selection

_DIGITS3 = re.compile(r"\d{3,}")

# Words that carry no medical content: stripped from both ends of a candidate ("history of fever" ->
# "fever"), and a candidate made only of them is dropped. English function words plus vignette filler.
FILLER = frozenset("""
    a an the and or but nor of to in on at by for from with without into onto over under about after before
    during since until than then as is are was were be been being has have had do does did this that these
    those it its he she his her him they them their there which what who whom whose when where why how
    not no any all some most more less very also only just following likely best next appropriate
    presents presented presenting shows showed show reveals revealed brought comes came complains complaining
    reports reported history examination physician doctor clinic department emergency visit patient
    patients year years old day days week weeks month months ago now currently otherwise further
    because due while per which one two three several
""".split())


def _trim(candidate: str) -> str:
    ws = candidate.split()
    while ws and ws[0].lower().strip(",;:.()") in FILLER:
        ws.pop(0)
    while ws and ws[-1].lower().strip(",;:.()") in FILLER:
        ws.pop()
    return " ".join(ws).strip(" ,;:.|()[]")


def select_keywords(candidates: Iterable[str], identifier_words: set[str], max_words: int | None = None
                    ) -> list[str]:
    """Keep candidates in rank order, trimmed of filler, that touch no identifier, hold no number of 3+
    digits and share no word with a keyword already kept; stop at ``max_words`` words in all."""
    kept, used, n = [], set(), 0
    for cand in candidates:
        cand = _trim(cand)
        ws = [w.lower() for w in words(cand)]
        if not ws or all(w.isdigit() for w in ws) or _DIGITS3.search(cand) or "|" in cand:
            continue
        if any(w in identifier_words for w in ws) or any(w in used for w in ws):
            continue
        if max_words is not None and n + len(ws) > max_words:
            continue
        kept.append(cand)
        used.update(ws)
        n += len(ws)
    return kept


@dataclass(frozen=True)
class KeywordRecord:
    id: str
    keywords: list[str]
    options: dict[str, str]
    answer: str | None
    words_total: int
    words_kept: int

    @property
    def privacy_budget(self) -> float:
        return self.words_kept / self.words_total if self.words_total else 0.0

    def to_dict(self) -> dict:
        d = {"id": self.id, "keywords": self.keywords, "options": self.options}
        if self.answer is not None:
            d["answer"] = self.answer
        return {**d, "words_total": self.words_total, "words_kept": self.words_kept,
                "privacy_budget": round(self.privacy_budget, 4)}


MAX_SHARE = 0.45  # at most this share of a question's words become keywords (the paper kept about 42%)


def extract(q: Question, extractor: Extractor, max_share: float = MAX_SHARE) -> KeywordRecord:
    """Keywords of one question: mask identifiers, rank candidates, filter, count words."""
    spans = find_identifiers(q.question)
    identifier_words = {w.lower() for s in spans for w in words(s.text(q.question))}
    total = len(words(q.question))
    kws = select_keywords(extractor.candidates(mask(q.question, spans), total), identifier_words,
                          max_words=math.floor(max_share * total))
    return KeywordRecord(q.id, kws, dict(q.options), q.answer, total, sum(len(words(k)) for k in kws))


@dataclass
class BudgetTotals:
    questions: int = 0
    words_total: int = 0
    words_kept: int = 0
    no_keywords: list[str] = field(default_factory=list)

    def add(self, r: KeywordRecord) -> None:
        self.questions += 1
        self.words_total += r.words_total
        self.words_kept += r.words_kept
        if not r.keywords:
            self.no_keywords.append(r.id)

    @property
    def privacy_budget(self) -> float:
        """Share of all question words kept (words-weighted, not a mean of per-question shares)."""
        return self.words_kept / self.words_total if self.words_total else 0.0

    def summary(self) -> dict:
        return {"questions": self.questions, "words_total": self.words_total, "words_kept": self.words_kept,
                "privacy_budget": round(self.privacy_budget, 4), "questions_without_keywords": len(self.no_keywords)}


def run(questions_file: str | Path, out: str | Path, extractor: Extractor, max_share: float = MAX_SHARE,
        progress: bool = True) -> BudgetTotals:
    """Extract keywords of every question into ``out`` (JSONL, rewritten: this step is local and cheap)."""
    questions = load_questions(questions_file)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    totals = BudgetTotals()
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for q in tqdm(questions, desc="keywords", unit="q", disable=not progress, dynamic_ncols=True):
            rec = extract(q, extractor, max_share)
            totals.add(rec)
            f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
    tmp.replace(out)
    if totals.no_keywords:
        log.warning("%d questions got no keywords (e.g. %s)", len(totals.no_keywords), totals.no_keywords[:3])
    return totals
