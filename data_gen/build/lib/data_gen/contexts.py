"""``contexts``: an LLM writes medical context for a question from its keywords and options only.

The contextual prompt of privacy-preserving contextual prompting (Zhang et al., ICLR 2024),
in this project's own words: an instruction, five demonstrations written for this project,
then ``Question Keywords: ...``, ``Candidate Answers: (a) ... (b) ...`` and ``Context:``.
The question text is never read here: the input is the ``keywords`` output, so nothing but
keywords and options can reach the endpoint.

The reply is parsed into an overall context, one context per option and a preliminary
answer. Truncated (``finish_reason == "length"``) and malformed replies are never stored as
results: they go to ``<out>.rejected.jsonl`` with the reason and the raw text, are counted,
and are not requested again (at temperature 0 the same prompt gives the same reply) unless
``--retry_rejected`` is given. Resume, rate limits, the cost cap and the Batch API are the
shared ``runner`` machinery; the request id is ``ctx-<question id>``, so each question gets
exactly one stored context.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .client import Completion
from .errors import DataError
from .runner import Job, RunSettings, RunSummary, run_jobs
from .store import JsonlStore, read_records

log = logging.getLogger(__name__)

LABELS = "abcdefghij"

CONTEXT_SYSTEM = "You are an experienced physician who explains clinical reasoning to colleagues."

CONTEXT_INSTRUCTION = """\
A clinical multiple-choice question has been reduced to its medical keywords; the question itself is \
withheld. Using the keywords and the candidate answers, write the medical background a clinician would \
recall while working through the case. Use exactly this layout:
Overall: what the keywords together suggest about the patient's condition, and which knowledge is \
needed to choose between the answers, in two to four sentences.
Then one line for each candidate answer, starting with its label, e.g. (a): the relevant facts about \
that answer and whether, and why, it fits the keywords.
Preliminary answer: the label of the best-supported candidate answer, e.g. (b).
Do not invent patient details that the keywords do not give."""

# Five demonstrations written for this project: (keywords, options, overall, per-option contexts, answer).
DEMONSTRATIONS: list[tuple[list[str], list[str], str, list[str], str]] = [
    (["high fever", "productive cough", "rust-colored sputum", "pleuritic chest pain", "lobar consolidation"],
     ["Streptococcus pneumoniae", "Mycoplasma pneumoniae", "Legionella pneumophila", "Pneumocystis jirovecii"],
     "Abrupt high fever with productive cough, rusty sputum, pleuritic pain and consolidation of a whole lobe "
     "is the classic picture of typical community-acquired pneumonia. The choice is between typical and atypical "
     "pathogens, which differ in onset, sputum and radiographic pattern.",
     ["The most common cause of community-acquired pneumonia; it produces lobar consolidation and rust-colored "
      "sputum from alveolar haemorrhage. It fits every keyword.",
      "Causes atypical, 'walking' pneumonia in young adults, with dry cough and patchy interstitial infiltrates "
      "rather than lobar consolidation. It fits poorly.",
      "Causes severe pneumonia with high fever, often with diarrhoea, hyponatraemia and confusion after exposure "
      "to contaminated water; rusty sputum is not typical. It fits partly.",
      "Causes pneumonia in immunocompromised patients, with dry cough, hypoxaemia and bilateral ground-glass "
      "opacities, not lobar consolidation. It does not fit."],
     "a"),
    (["polyuria", "polydipsia", "abdominal pain", "Kussmaul breathing", "fruity breath odor", "high anion gap"],
     ["Hyperosmolar hyperglycemic state", "Diabetic ketoacidosis", "Lactic acidosis", "Salicylate toxicity"],
     "Polyuria and polydipsia point to hyperglycaemia; deep Kussmaul breathing, a fruity (acetone) odour and a "
     "high anion gap point to ketoacidosis. The question is which metabolic emergency combines both.",
     ["Marked hyperglycaemia and hyperosmolality with little or no ketosis, usually in older type 2 diabetics; "
      "Kussmaul breathing and acetone breath are unusual. It fits poorly.",
      "Insulin deficiency leads to hyperglycaemia and ketone production, causing a high anion gap metabolic "
      "acidosis, abdominal pain, Kussmaul respiration and fruity breath. It fits all keywords.",
      "Gives a high anion gap acidosis with rapid breathing, but in shock or hypoxia, without polyuria, "
      "polydipsia or ketones on the breath. It fits partly.",
      "Causes a mixed respiratory alkalosis and high anion gap acidosis with tinnitus and hyperventilation; it "
      "does not explain polyuria, polydipsia or acetone breath. It does not fit."],
     "b"),
    (["atrial fibrillation", "mechanical mitral valve", "long-term anticoagulation"],
     ["Apixaban", "Dabigatran", "Warfarin", "Aspirin alone"],
     "A patient with atrial fibrillation and a mechanical heart valve needs lifelong anticoagulation to prevent "
     "valve thrombosis and embolism. The key fact is which anticoagulants are approved for mechanical valves.",
     ["A direct factor Xa inhibitor used in non-valvular atrial fibrillation; it is not recommended with "
      "mechanical valves. It does not fit.",
      "A direct thrombin inhibitor that caused more valve thrombosis and bleeding than warfarin in patients with "
      "mechanical valves; it is contraindicated. It does not fit.",
      "A vitamin K antagonist, dosed to a target INR, and the standard anticoagulant for mechanical heart valves "
      "with or without atrial fibrillation. It fits.",
      "An antiplatelet agent that does not prevent valve thrombosis adequately on its own. It does not fit."],
     "c"),
    (["heat intolerance", "weight loss", "exophthalmos", "pretibial myxedema", "diffuse goiter"],
     ["Toxic multinodular goiter", "Subacute granulomatous thyroiditis", "Toxic adenoma",
      "Factitious thyrotoxicosis", "Graves disease"],
     "Heat intolerance and weight loss indicate hyperthyroidism; exophthalmos and pretibial myxoedema are signs "
     "of autoimmune stimulation of the thyroid and orbital tissue. The cause of the thyrotoxicosis is asked.",
     ["Hyperthyroidism from autonomous nodules in older patients; the gland is nodular, and eye disease and "
      "dermopathy are absent. It fits partly.",
      "Painful thyroid inflammation after a viral illness with transient thyrotoxicosis; no ophthalmopathy or "
      "dermopathy. It does not fit.",
      "A single autonomous nodule causing hyperthyroidism without eye or skin signs. It fits partly.",
      "Thyroid hormone taken in excess; the gland is small and there are no eye or skin signs. It does not fit.",
      "Autoantibodies stimulate the TSH receptor, causing diffuse goitre, hyperthyroidism, ophthalmopathy and "
      "pretibial myxoedema. It fits all keywords."],
     "e"),
    (["resting tremor", "bradykinesia", "cogwheel rigidity", "shuffling gait", "loss of smell"],
     ["Essential tremor", "Normal pressure hydrocephalus", "Huntington disease", "Parkinson disease"],
     "Resting tremor, slowness of movement and rigidity form the parkinsonian triad; a shuffling gait and loss of "
     "smell support a neurodegenerative cause. The answers are movement disorders to tell apart.",
     ["An action tremor of the hands and head that improves with alcohol, without bradykinesia or rigidity. It "
      "does not fit.",
      "Gait disturbance with urinary incontinence and dementia; tremor at rest is not part of it. It fits partly.",
      "An autosomal dominant disorder with chorea, psychiatric symptoms and dementia rather than a resting "
      "tremor. It does not fit.",
      "Loss of dopaminergic neurons in the substantia nigra causes resting tremor, bradykinesia, cogwheel rigidity "
      "and a shuffling gait; anosmia often comes first. It fits all keywords."],
     "d"),
]


def format_query(keywords: Sequence[str], options: Sequence[str]) -> str:
    """The two lines describing one question; keywords are comma-separated, options labelled (a), (b), ..."""
    answers = " ".join(f"({LABELS[i]}) {o.strip()}" for i, o in enumerate(options))
    return f"Question Keywords: {', '.join(k.strip() for k in keywords)}\nCandidate Answers: {answers}"


def format_context(overall: str, option_contexts: Sequence[str], answer_label: str) -> str:
    lines = [f"Overall: {overall}"] + [f"({LABELS[i]}) {c}" for i, c in enumerate(option_contexts)]
    return "\n".join(lines + [f"Preliminary answer: ({answer_label})"])


def prompt_prefix() -> str:
    """The part of the prompt that is the same for every question: the instruction and the demonstrations."""
    demos = "\n\n".join(f"{format_query(k, o)}\nContext:\n{format_context(ov, oc, a)}"
                        for k, o, ov, oc, a in DEMONSTRATIONS)
    return f"{CONTEXT_INSTRUCTION}\n\n{demos}\n\n"


def context_messages(keywords: Sequence[str], options: Sequence[str]) -> list[dict]:
    user = f"{prompt_prefix()}{format_query(keywords, options)}\nContext:"
    return [{"role": "system", "content": CONTEXT_SYSTEM}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class ParsedContext:
    overall: str
    option_contexts: list[str]  # in option order
    preliminary: int | None  # option index


class Malformed(ValueError):
    """A reply that does not follow the layout; the message says what is wrong."""


_OVERALL = re.compile(r"^\W*overall(?:\s+context)?\W*?:\s*", re.I)
_OPTION = re.compile(r"^[ \t*_-]*\(([a-j])\)[ \t*_:.-]*", re.I | re.M)
_PRELIM = re.compile(r"^[ \t*_#]*preliminary\s+answer\W*?:[ \t*]*(.*)$", re.I | re.M)
_ANSWER_LABEL = re.compile(r"^(?:\(([a-j])\)|([a-j])(?:[.):]|$))", re.I)  # "(c)", "c", "C." - not "a drug"


def parse_context(text: str, options: Sequence[str], finish_reason: str = "stop") -> ParsedContext:
    """Parse a reply; raise ``Malformed`` when it is truncated or does not follow the layout."""
    if finish_reason == "length":
        raise Malformed("truncated (finish_reason 'length')")
    body = re.sub(r"^\s*context\s*:\s*", "", text.strip(), flags=re.I)
    m = _OVERALL.match(body)
    if not m:
        raise Malformed("no 'Overall:' context at the start")
    prelim = list(_PRELIM.finditer(body))
    if len(prelim) != 1:
        raise Malformed("no 'Preliminary answer:' line" if not prelim else "more than one 'Preliminary answer:'")
    end = prelim[0].start()
    labels = list(_OPTION.finditer(body, m.end(), end))
    got = [o.group(1).lower() for o in labels]
    want = list(LABELS[:len(options)])
    if got != want:
        raise Malformed(f"option contexts {got} instead of {want}")
    overall = body[m.end():labels[0].start()].strip()
    if not overall:
        raise Malformed("empty overall context")
    contexts = []
    for i, o in enumerate(labels):
        chunk = body[o.end():labels[i + 1].start() if i + 1 < len(labels) else end].strip()
        opt = options[i].strip()
        if chunk.lower().startswith(opt.lower()):  # "(a) Warfarin: ..." -> "..."
            rest = chunk[len(opt):].lstrip()
            if rest[:1] in (":", "-", "–", "—"):
                chunk = rest[1:].strip()
        if not chunk:
            raise Malformed(f"empty context for option ({LABELS[i]})")
        contexts.append(chunk)
    return ParsedContext(overall, contexts, _preliminary(prelim[0].group(1), options))


def _preliminary(value: str, options: Sequence[str]) -> int | None:
    """The option index a 'Preliminary answer:' names, None when it names none (e.g. 'uncertain')."""
    value = value.strip().strip("*").strip()
    m = _ANSWER_LABEL.match(value)
    if m:
        label = (m.group(1) or m.group(2)).lower()
        k = LABELS.index(label)
        if k >= len(options):
            raise Malformed(f"preliminary answer ({label}) is not one of the options")
        return k
    by_text = [i for i, o in enumerate(options) if value.rstrip(".").lower() == o.strip().lower()]
    return by_text[0] if by_text else None


# ----------------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class KeywordInput:
    id: str
    keywords: list[str]
    options: dict[str, str]


def load_keywords(path: str | Path) -> list[KeywordInput]:
    """Read the ``keywords`` output; problems name the file, record and field."""
    out, seen = [], {}
    for i, r in enumerate(read_records(path)):
        qid = r.get("id")
        if not isinstance(qid, str) or not qid:
            raise DataError(path, i, "id", "missing, empty or not a string")
        if qid in seen:
            raise DataError(path, i, "id", f"duplicate id {qid!r} (first at record {seen[qid]})")
        seen[qid] = i
        kws = r.get("keywords")
        if not isinstance(kws, list) or not all(isinstance(k, str) for k in kws):
            raise DataError(path, i, "keywords", "expected a list of strings")
        opts = r.get("options")
        if isinstance(opts, list):
            opts = {LABELS[k].upper(): v for k, v in enumerate(opts)}
        if not isinstance(opts, dict) or not 2 <= len(opts) <= len(LABELS):
            raise DataError(path, i, "options", f"expected 2 to {len(LABELS)} options")
        for k, v in opts.items():
            if not isinstance(v, str) or not v.strip():
                raise DataError(path, i, f"options.{k}", "missing, empty or not a string")
        out.append(KeywordInput(qid, kws, {str(k): v for k, v in opts.items()}))
    if not out:
        raise DataError(path, None, None, "no records")
    return out


# ----------------------------------------------------------------------------------------------- running

@dataclass(frozen=True)
class ContextConfig:
    model: str = "gpt-3.5-turbo"
    temperature: float = 0.0
    max_tokens: int = 1000


def request_id(qid: str) -> str:
    return f"ctx-{qid}"


def make_jobs(items: Sequence[KeywordInput], cfg: ContextConfig) -> list[Job]:
    jobs = []
    for it in items:
        body = {"model": cfg.model, "messages": context_messages(it.keywords, list(it.options.values())),
                "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        jobs.append(Job(request_id=request_id(it.id), body=body, meta={"item": it}))
    return jobs


def to_record(job: Job, completion: Completion) -> dict:
    """The stored record: a parsed context, or a rejection (``rejected`` says why) kept apart."""
    it: KeywordInput = job.meta["item"]
    keys = list(it.options)
    base = {"request_id": job.request_id, "id": it.id}
    tail = {"model": completion.model, "finish_reason": completion.finish_reason, "usage": completion.usage()}
    try:
        p = parse_context(completion.content, list(it.options.values()), completion.finish_reason)
    except Malformed as e:
        return {**base, "rejected": "truncated" if completion.finish_reason == "length" else "malformed",
                "reason": str(e), "raw": completion.content, **tail}
    return {**base, "overall_context": p.overall, "option_contexts": dict(zip(keys, p.option_contexts)),
            "preliminary_answer": None if p.preliminary is None else keys[p.preliminary], **tail}


class ContextStore:
    """The results store (``--out``, accepted contexts only) and the rejections beside it, as one store.

    The runner asks ``store.get(request_id)`` to skip finished work and calls ``append``; a
    request counts as finished when accepted, or when rejected unless rejections are retried.
    Rejections are keyed ``<request id>#<n>`` so a retried request can be rejected again.
    """

    def __init__(self, path: str | Path, retry_rejected: bool = False):
        self.accepted = JsonlStore(path)
        self.rejections = JsonlStore(Path(path).with_name(Path(path).name + ".rejected.jsonl"), "rejection_id")
        self.path = self.accepted.path
        self.retry_rejected = retry_rejected
        self.superseding = False  # an accepted context is final; a retried rejection gets a new rejection id
        self.times_rejected: dict[str, int] = {}
        for r in self.rejections.records.values():
            self.times_rejected[r["request_id"]] = self.times_rejected.get(r["request_id"], 0) + 1

    def get(self, rid: str) -> dict | None:
        """The record that finishes request ``rid``: its context, else (rejections not retried) its last rejection."""
        if rid in self.accepted:
            return self.accepted.get(rid)
        if not self.retry_rejected and rid in self.times_rejected:
            return self.rejections.get(f"{rid}#{self.times_rejected[rid] - 1}")
        return None

    def __contains__(self, rid: str) -> bool:
        return self.get(rid) is not None

    def append(self, record: dict) -> None:
        if "rejected" not in record:
            self.accepted.append(record)
            return
        n = self.times_rejected.get(record["request_id"], 0)
        self.rejections.append({"rejection_id": f"{record['request_id']}#{n}", **record})
        self.times_rejected[record["request_id"]] = n + 1

    def counts(self, jobs: Sequence[Job]) -> dict:
        """Per question of this run: accepted, rejected (by reason of the last rejection) or missing."""
        last: dict[str, str] = {}
        for r in self.rejections.records.values():
            last[r["request_id"]] = r["rejected"]
        out = {"accepted": 0, "rejected_malformed": 0, "rejected_truncated": 0, "missing": 0}
        for j in jobs:
            if j.request_id in self.accepted:
                out["accepted"] += 1
            elif j.request_id in last:
                out[f"rejected_{last[j.request_id]}"] += 1
            else:
                out["missing"] += 1
        return out

    def close(self) -> None:
        self.accepted.close()
        self.rejections.close()


def generate(keywords_file: str | Path, out: str | Path, cfg: ContextConfig, settings: RunSettings,
             retry_rejected: bool = False) -> tuple[RunSummary, dict]:
    """Run (or resume) context generation; returns the run summary and per-question counts."""
    items = load_keywords(keywords_file)
    empty = [it.id for it in items if not it.keywords]
    if empty:
        log.warning("%d questions have no keywords; their contexts rest on the options alone (e.g. %s)",
                    len(empty), empty[:3])
    jobs = make_jobs(items, cfg)
    store = ContextStore(out, retry_rejected)
    try:
        summary = run_jobs(jobs, store, to_record, settings, desc="contexts")
        counts = store.counts(jobs)
    finally:
        store.close()
    rejected = counts["rejected_malformed"] + counts["rejected_truncated"]
    if rejected:
        log.warning("%d replies were rejected (malformed or truncated); see %s.rejected.jsonl, "
                    "and rerun with --retry_rejected to request them again", rejected, out)
    return summary, counts

