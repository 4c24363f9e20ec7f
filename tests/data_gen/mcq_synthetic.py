"""Synthetic multiple-choice questions whose answer only the context knows, and the fake LLM's knowledge.

Each question describes a patient with one made-up finding (a pseudo-word such as
``quelvine``, a different one per question, named twice so keyword extraction keeps it)
and offers made-up diseases as options. Which disease the finding belongs to is a random
fact known only to ``ContextOracle``, the "medical knowledge" of the fake LLM server: given
the keywords and options of a ``contexts`` request, it names the option the context
supports. So the question text alone gives chance-level accuracy (the correct option is
drawn uniformly from the options, the options uniformly from a shared pool), while the
context the fake server writes says which option fits.

Every question also carries planted identifiers (a name, a date, a record number and a
place and an age, e.g. "Ms. Ingrid Halvorsen", "March 14, 2019", "MRN 5830271", "Brookhaven",
"45-year-old") so the
same questions test that identifiers never reach the server.

    qs = make_questions(200, seed=0)
    write_questions(tmp_path / "questions.jsonl", qs)
    server = fake_server(context_rule=ContextOracle(qs))
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl",
           "qu", "st", "tr", "vr", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "n", "l", "r", "x", "m"]
_SUFFIXES = ["ine", "ose", "ary", "oid", "ent", "ular"]

FIRST_NAMES = ["Ingrid", "Tobias", "Marisol", "Dmitri", "Aaliyah", "Benedikt", "Yesenia", "Oskar", "Priyanka",
               "Lorenzo", "Henrietta", "Kwame"]
LAST_NAMES = ["Halvorsen", "Okonkwo", "Vasquez", "Lindqvist", "Abernathy", "Castellano", "Nakagawa", "Duchamp",
              "Mbeki", "Rasmussen", "Featherstone", "Quintero"]
PLACES = ["Brookhaven", "Millbridge", "Oakridge", "Thornbury", "Ravenswood", "Silverlake", "Ashford", "Kingsport"]
MONTHS = ["January", "February", "March", "April", "June", "July", "August", "September", "October", "November",
          "December"]
SITES = ["forearm", "abdomen", "lower back", "scalp", "left knee", "upper chest"]
LESIONS = ["rash", "plaques", "nodules", "papules"]
SYMPTOMS = ["mild fatigue", "intermittent headache", "low-grade fever", "joint stiffness", "poor appetite",
            "night sweats"]


# Hand-written vignettes with identifiers planted in the forms records use: (question, identifiers).
IDENTIFIER_VIGNETTES = [
    ("A 45-year-old man named John Smith (MRN 4482913) from Springfield presents on March 3, 2021 with crushing "
     "substernal chest pain radiating to the left arm and diaphoresis. He has Parkinson disease. ECG shows "
     "ST-segment elevation in leads II, III and aVF. Which of the following is the most likely diagnosis?",
     ["45-year-old", "John Smith", "4482913", "Springfield", "March 3, 2021"]),
    ("Maria presents with fever and a productive cough. Metformin was started on 12/03/2020. Ms. Lopez, 32 F, "
     "lives in Dayton; sputum grew Staphylococcus aureus. Call 555-123-4567, record number AB-12345.",
     ["Maria", "12/03/2020", "Ms. Lopez", "32 F", "Dayton", "555-123-4567", "AB-12345"]),
    ("Mrs. Evelyn Hartwell, aged 71, was admitted to Mercy General on Tuesday with new-onset atrial fibrillation "
     "and a serum potassium of 2.9 mEq/L. Her daughter Claire says she takes furosemide. Patient ID: X99812.",
     ["Evelyn Hartwell", "aged 71", "Mercy General", "Tuesday", "Claire", "X99812"]),
    ("A 6-week-old boy born on 2023-11-04 in Lagos is brought with projectile non-bilious vomiting after every "
     "feed; an olive-shaped mass is palpated in the epigastrium (chart #88213, email kid.parent@example.org).",
     ["6-week-old", "2023-11-04", "Lagos", "88213", "kid.parent@example.org"]),
]



def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)) + rng.choice(
        _SUFFIXES)


@dataclass(frozen=True)
class SyntheticQuestion:
    id: str
    question: str
    options: dict[str, str]  # "A".. -> made-up disease name
    answer: str  # the correct letter
    finding: str  # the made-up finding word the oracle keys on
    identifiers: list[str] = field(default_factory=list)  # planted: name, date, record number, place

    def record(self) -> dict:
        """The line of a QUESTIONS file: {"id", "question", "options", "answer"}."""
        return {"id": self.id, "question": self.question, "options": self.options, "answer": self.answer}


def make_questions(n: int, seed: int = 0, n_options: int = 4, n_diseases: int = 40,
                   with_identifiers: bool = True) -> list[SyntheticQuestion]:
    """``n`` questions, deterministic in ``seed``; findings are unique, diseases come from a pool of ``n_diseases``."""
    rng = random.Random(seed)
    taken: set[str] = set()

    def fresh() -> str:
        while True:
            w = _pseudo_word(rng)
            if w not in taken:
                taken.add(w)
                return w

    diseases = [f"{fresh().capitalize()} {rng.choice(['syndrome', 'disease', 'fever', 'dystrophy'])}"
                for _ in range(n_diseases)]
    out = []
    for i in range(n):
        finding = fresh()
        options = rng.sample(diseases, n_options)
        answer = "ABCDEFGHIJ"[rng.randrange(n_options)]
        lesion, site = rng.choice(LESIONS), rng.choice(SITES)
        symptom = rng.choice(SYMPTOMS)
        idents: list[str] = []
        age = f"{rng.randint(19, 84)}-year-old"
        opening = f"A {age} patient"
        tail = ""
        if with_identifiers:
            name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
            date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1995, 2023)}"
            mrn = f"MRN {rng.randint(1_000_000, 9_999_999)}"
            place = rng.choice(PLACES)
            title = rng.choice(["Mr.", "Ms."])
            opening = f"{title} {name} ({mrn}), a {age} from {place},"
            tail = f" The first visit was on {date}."
            idents = [name, date, mrn.split()[1], place, age]
        question = (f"{opening} presents with {finding} {lesion} on the {site} and {symptom}.{tail} "
                    f"The {finding} {lesion} appeared two weeks ago and have slowly spread. "
                    f"Which of the following is the most likely diagnosis?")
        out.append(SyntheticQuestion(id=f"syn-{seed}-{i:05d}", question=question,
                                     options={"ABCDEFGHIJ"[k]: o for k, o in enumerate(options)},
                                     answer=answer, finding=finding, identifiers=idents))
    return out


def write_questions(path: str | Path, questions: Sequence[SyntheticQuestion]) -> Path:
    """A QUESTIONS JSONL file for ``python -m data_gen keywords --in``."""
    path = Path(path)
    path.write_text("".join(json.dumps(q.record()) + "\n" for q in questions), encoding="utf-8")
    return path


class ContextOracle:
    """The fake LLM's knowledge, as a ``FakeOpenAI(context_rule=...)``: which option a context supports.

    ``oracle(keywords, options)`` finds the question by its made-up finding among the
    keywords' words and returns the index of its correct option among ``options`` (matched by
    text, so option order does not matter); None when no keyword names a known finding.
    With ``accuracy < 1`` the oracle supports a wrong option for that share of questions
    (decided per finding, deterministically), to model an imperfect LLM.
    """

    def __init__(self, questions: Sequence[SyntheticQuestion], accuracy: float = 1.0, seed: int = 0):
        self.truth = {q.finding: q.options[q.answer] for q in questions}
        rng = random.Random(seed)
        self.wrong = {q.finding for q in questions if rng.random() >= accuracy}

    def __call__(self, keywords: Sequence[str], options: Sequence[str]) -> int | None:
        for word in (w.lower() for k in keywords for w in k.split()):
            if word in self.truth:
                names = [o.lower() for o in options]
                correct = self.truth[word].lower()
                if correct not in names:
                    return None
                k = names.index(correct)
                return (k + 1) % len(options) if word in self.wrong else k
        return None
