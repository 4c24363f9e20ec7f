"""Synthetic instruction corpora for tests and benchmarks (not used by the commands).

``variants(base, n)`` makes ``n`` instructions from a few hundred real ones by
recombining and lightly editing them (swap a condition or a drug, drop or insert words,
change the opening verb, add a population): some are near-duplicates of each other or of
the base, most are not - the situation ``dedup`` faces with model-generated tasks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

VERBS = ["Explain", "Describe", "Summarize", "List", "Compare", "Outline", "Discuss", "Identify", "Classify",
         "Evaluate", "Suggest", "Write", "Provide", "Analyze", "Interpret", "Recommend", "Clarify", "Rewrite"]
CONDITIONS = ["type 2 diabetes", "asthma", "atrial fibrillation", "migraine", "sepsis", "psoriasis",
              "chronic kidney disease", "major depression", "hypothyroidism", "tuberculosis", "heart failure",
              "multiple sclerosis", "gout", "iron deficiency anemia", "community-acquired pneumonia", "lupus",
              "osteoporosis", "COPD", "hepatitis B", "HIV infection", "Parkinson's disease", "epilepsy",
              "rheumatoid arthritis", "Crohn's disease", "ulcerative colitis", "celiac disease", "glaucoma",
              "otitis media", "bronchiolitis", "preeclampsia", "gestational diabetes", "endometriosis",
              "prostate cancer", "breast cancer", "melanoma", "leukemia", "stroke", "pulmonary embolism",
              "deep vein thrombosis", "hypertension", "hyperlipidemia", "obesity", "anorexia nervosa",
              "schizophrenia", "bipolar disorder", "ADHD", "autism spectrum disorder", "Lyme disease",
              "malaria", "dengue fever", "measles", "pertussis", "scabies", "cellulitis", "appendicitis",
              "pancreatitis", "cirrhosis", "kidney stones", "urinary tract infection", "sickle cell disease"]
DRUGS = ["metformin", "insulin glargine", "lisinopril", "amlodipine", "atorvastatin", "warfarin", "apixaban",
         "levothyroxine", "sertraline", "lithium", "methotrexate", "prednisone", "amoxicillin", "azithromycin",
         "ibuprofen", "paracetamol", "morphine", "furosemide", "spironolactone", "omeprazole", "salbutamol",
         "budesonide", "adalimumab", "tamoxifen", "isoniazid", "valproate", "levetiracetam", "allopurinol"]
ASPECTS = ["the pathophysiology of", "first-line treatment options for", "common complications of",
           "the diagnostic criteria for", "risk factors for", "patient education points about",
           "the differential diagnosis of", "screening recommendations for", "prognosis of",
           "nursing considerations in", "the epidemiology of", "early warning signs of",
           "lifestyle changes that help with", "laboratory findings typical of"]
POPULATIONS = ["", "", "", " in elderly patients", " in children", " during pregnancy", " in athletes",
               " for a newly diagnosed patient", " in a low-resource setting", " for a medical student"]


def _splice(base: Sequence[str], rng: random.Random) -> str:
    """The start of one real instruction joined to the end of another, with a condition or drug swapped in."""
    a, b = rng.choice(base).split(), rng.choice(base).split()
    words = a[: rng.randint(1, max(1, len(a) - 1))] + b[rng.randint(0, max(0, len(b) - 2)):]
    words[rng.randrange(len(words))] = rng.choice(CONDITIONS + DRUGS)
    return " ".join(words)


def _fresh(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return f"{rng.choice(VERBS)} {rng.choice(ASPECTS)} {rng.choice(CONDITIONS)}{rng.choice(POPULATIONS)}."
    if r < 0.8:
        return (f"{rng.choice(VERBS)} how {rng.choice(DRUGS)} is used in {rng.choice(CONDITIONS)}, "
                f"including {rng.choice(['dosing', 'side effects', 'monitoring', 'contraindications'])}"
                f"{rng.choice(POPULATIONS)}.")
    return (f"A {rng.randint(18, 90)}-year-old with {rng.choice(CONDITIONS)} is taking {rng.choice(DRUGS)}. "
            f"{rng.choice(VERBS)} {rng.choice(ASPECTS)} {rng.choice(CONDITIONS)} for this patient.")


def _edit(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.3 and len(words) > 4:
            del words[rng.randrange(len(words))]
        elif op < 0.55:
            words.insert(rng.randrange(len(words) + 1), rng.choice(["also", "briefly", "clearly", "common",
                                                                    "typical", "main", "adult", "key"]))
        elif op < 0.75 and len(words) > 1:
            k = rng.randrange(len(words) - 1)
            words[k], words[k + 1] = words[k + 1], words[k]
        elif op < 0.9:
            words[0] = rng.choice(VERBS)
        else:
            words[rng.randrange(len(words))] = rng.choice(CONDITIONS + DRUGS)
    return " ".join(words)


def variants(base: Sequence[str], n: int, seed: int = 0, near_duplicate_rate: float = 0.2) -> list[str]:
    """``n`` instructions mixing edited copies of ``base``, fresh combinations, and edits of earlier output."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if r < near_duplicate_rate and out:
            out.append(_edit(rng.choice(out), rng))
        elif r < near_duplicate_rate + 0.05 and base:
            out.append(_edit(rng.choice(base), rng))
        elif r < near_duplicate_rate + 0.6 and base:
            out.append(_splice(base, rng))
        else:
            out.append(_fresh(rng))
    return out
