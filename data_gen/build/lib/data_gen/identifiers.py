"""Find the identifiers in a question (ages, dates, names, places, record numbers, contact details).

``keywords`` masks every span found here before any extractor sees the text, and drops any
keyword that still touches one afterwards, so identifiers never reach the LLM.

The rules are deliberately greedy: a medical word wrongly taken for a name costs one
keyword; a name taken for a medical word leaks it. Without a named-entity model, names and
places are recognised by form: a capitalised word (``Xxxx``) inside a sentence is a proper
noun unless it is a known medical eponym or organism; a capitalised word opening a sentence
is one when a proper noun follows it, when a comma or ``'s`` follows it, or when it is
neither a common sentence opener nor used in lower case elsewhere in the text. Any run of
proper nouns that contains one non-eponym (``Sarah Wilson``) is masked whole. This is a
safety net, not a certified de-identifier: de-identify real records before this step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_MONTHS = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?|"
           r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_MONTH_OR_MAY = rf"(?:{_MONTHS}|May)"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"

# (kind, compiled pattern). Order does not matter: overlapping spans are merged.
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("age", re.compile(r"\b\d{1,3}[- ](?:and[- ]a[- ]half[- ])?(?:years?|yrs?|months?|weeks?|days?)[- ]old\b",
                       re.I)),
    ("age", re.compile(r"\b(?:aged?|age of)\s+\d{1,3}\b", re.I)),
    ("age", re.compile(r"\b\d{1,3}\s*(?:years?|yrs?)(?:\s+of\s+age|\s+old)?\b", re.I)),
    ("age", re.compile(r"\b\d{1,3}\s*(?:y/?o|y\.o\.)(?=\W|$)", re.I)),
    ("age", re.compile(r"\b\d{1,3}\s?[MF]\b")),  # "45M", "32 F"
    ("date", re.compile(r"\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b")),
    ("date", re.compile(rf"\b{_DAY}\s+(?:of\s+)?{_MONTH_OR_MAY}\.?(?:,?\s+\d{{4}})?\b")),
    ("date", re.compile(rf"\b{_MONTH_OR_MAY}\.?\s+{_DAY}(?:,?\s+\d{{4}})?\b")),
    ("date", re.compile(rf"\b{_MONTH_OR_MAY}\.?,?\s+\d{{4}}\b")),
    ("date", re.compile(rf"\b{_MONTHS}\b")),  # "May" alone is usually the verb
    ("date", re.compile(r"\b(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day\b")),
    ("date", re.compile(r"\b(?:18|19|20)\d{2}\b")),
    ("record", re.compile(
        r"\b(?:MRN|medical record(?:\s+(?:number|no\.?))?|record\s+(?:number|no\.?)|patient\s+ID|ID|SSN|"
        r"social security(?:\s+number)?|account(?:\s+number)?|case\s+(?:number|no\.?)|chart(?:\s+number)?|"
        r"insurance(?:\s+number)?|bed|room)\s*(?:number|no\.?|#)?\s*[:#]?\s*[A-Z]{0,3}-?\d[\dA-Z-]*", re.I)),
    ("record", re.compile(r"#\s*\d+")),
    ("record", re.compile(r"\b[A-Z]{0,4}\d{5,}[A-Z0-9]*\b")),  # long numbers: ids, phone numbers
    ("contact", re.compile(r"\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b")),
    ("contact", re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")),
    ("contact", re.compile(r"\bhttps?://\S+|\bwww\.\S+", re.I)),
    ("name", re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sr|Jr)\.?\s+[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*)*")),
    ("name", re.compile(r"\b(?:named|called|name is|names? are)\s+[A-Z][\w'’-]*(?:\s+(?:and\s+)?[A-Z][\w'’-]*)*")),
]

# Capitalised medical words that are not identifiers (eponyms, organisms, scores). A word here
# is still masked when it stands next to a proper noun that is not here ("Sarah Wilson").
MEDICAL_PROPER = frozenset(w.lower() for w in """
    Addison Alzheimer Apgar Asperger Babinski Barr Barre Barré Bell Bordetella Borrelia Breslow Brudzinski
    Brugada Burkitt Campylobacter Candida Chagas Chlamydia Chvostek Clostridium Clostridioides Coombs
    Corynebacterium Crohn Cushing Down Ebola Ehlers Danlos Ellison Enterococcus Epstein Escherichia Fallot
    Gardnerella Gilbert Glasgow Gleason Gram Graves Guillain Haemophilus Hashimoto Helicobacter Hirschsprung
    Hodgkin Horner Huntington Kaposi Kawasaki Kernig Klebsiella Klinefelter Korsakoff Legionella Listeria Lyme
    Marfan McBurney Meckel Meniere Mycobacterium Mycoplasma Neisseria Paget Parkinson Pneumocystis Proteus
    Pseudomonas Raynaud Reiter Reye Rickettsia Rinne Romberg Salmonella Sjogren Sjögren Shigella
    Staphylococcus Streptococcus Tay Sachs Tinel Phalen Tourette Toxoplasma Treponema Trousseau Turner
    Vibrio Virchow Weber Wernicke Whipple Wilms Wilson Zika Zollinger Kussmaul Cheyne Stokes Duchenne Becker
    Fanconi Bartter Gitelman Conn Cushing's Homan Homans Hoffmann Kehr Levine Murphy Ortolani Barlow Lachman
    Schilling Wells Ranson Child Pugh Killip Bethesda Papanicolaou Pap Westergren Wright Giemsa Ziehl Neelsen
    """.split())

# Words that open sentences of medical questions and are not names.
SENTENCE_OPENERS = frozenset("""
    a an the this that these those which what who whom whose when where why how he she his her they their
    there it its in on at after before during for from with without over under upon within while if since
    laboratory physical examination vital temperature pulse blood serum urine urinalysis family past medical
    history current medications chest abdominal neurologic neurological cardiac pulmonary treatment diagnosis
    imaging biopsy results findings symptoms patient patients mother father parents both one two three
    several many most some all no otherwise further subsequent initial routine on examination auscultation
    palpation she's he's she'd he'd her his vaccination vaccinations immunizations social surgical allergies
    review assessment plan labs test tests studies x-ray radiograph ultrasound ct mri ecg ekg echocardiography
    cardiology dermatology neurology pediatrics obstetrics gynecology surgery emergency hospital admission
    fever cough pain headache nausea vomiting diarrhea rash weakness fatigue
    """.split())

NAME, EPONYM, OTHER = "name", "eponym", "other"
_WORD = re.compile(r"[A-Za-z][\w'’-]*")
_SENTENCE_END = re.compile(r"[.!?:;\n]\s*$")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str

    def text(self, source: str) -> str:
        return source[self.start:self.end]


def _is_proper(word: str) -> bool:
    """``Xxxx``: capitalised, not an acronym (``HIV``), not mixed case (``HbA1c``)."""
    core = re.sub(r"['’]s$", "", word)
    return len(core) > 1 and core[0].isupper() and core[1:].replace("-", "").replace("'", "").islower()


def _base(word: str) -> str:
    return re.sub(r"['’]s$", "", word).lower()


def _proper_noun_spans(text: str) -> list[Span]:
    words = list(_WORD.finditer(text))
    lower_elsewhere = {m.group().lower() for m in words if m.group()[0].islower()}

    def adjacent(i: int) -> bool:  # words i and i+1 are separated by white space only
        return i + 1 < len(words) and text[words[i].end():words[i + 1].start()].strip() == ""

    # Each word is NAME (a proper noun taken for an identifier), EPONYM (capitalised but medical) or OTHER.
    kinds = []
    for i, m in enumerate(words):
        w = m.group()
        if not _is_proper(w):
            kinds.append(OTHER)
        elif _base(w) in MEDICAL_PROPER:
            kinds.append(EPONYM)
        elif i > 0 and not _SENTENCE_END.search(text[:m.start()]):
            kinds.append(NAME)  # capitalised inside a sentence
        else:
            nxt = words[i + 1].group() if i + 1 < len(words) else ""
            name_follows = adjacent(i) and _is_proper(nxt) and _base(nxt) not in MEDICAL_PROPER
            comma_follows = text[m.end():m.end() + 3].startswith((",", "'s", "’s"))
            common = _base(w) in SENTENCE_OPENERS or _base(w) in lower_elsewhere
            kinds.append(NAME if (name_follows or comma_follows or not common) else OTHER)
    spans = []
    i = 0
    while i < len(words):
        if kinds[i] == OTHER:
            i += 1
            continue
        j = i  # extend over a run of adjacent capitalised words
        while adjacent(j) and kinds[j + 1] != OTHER:
            j += 1
        if NAME in kinds[i:j + 1]:
            spans.append(Span(words[i].start(), words[j].end(), "name_or_place"))
        i = j + 1
    return spans


def find_identifiers(text: str) -> list[Span]:
    """All identifier spans in ``text``, merged where they overlap, in order."""
    spans = [Span(m.start(), m.end(), kind) for kind, pat in PATTERNS for m in pat.finditer(text)]
    spans += _proper_noun_spans(text)
    spans.sort(key=lambda s: (s.start, -s.end))
    merged: list[Span] = []
    for s in spans:
        if merged and s.start <= merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(last.start, max(last.end, s.end), last.kind)
        else:
            merged.append(s)
    return merged


def mask(text: str, spans: list[Span], boundary: str = " | ") -> str:
    """``text`` with every span replaced by a phrase boundary, so no keyword can reach across it."""
    out, pos = [], 0
    for s in spans:
        out.append(text[pos:s.start])
        out.append(boundary)
        pos = s.end
    out.append(text[pos:])
    return "".join(out)
