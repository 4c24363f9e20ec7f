"""``judge``: pairwise LLM-as-judge of model outputs against reference outputs.

For every example the judge sees the model's output and the reference output twice, once
in each order (position bias cancels out), and answers ``Output (a)``, ``Output (b)`` or
``Tie``. A win counts 1, a tie 0.5, a loss 0; the win rate is the mean over all parsed
judgements, and its standard error is computed over per-example means (the two orders of
one example are not independent). Verdicts that cannot be parsed are counted and reported,
never dropped silently.

Every verdict is stored in an annotation cache (an append-only JSONL keyed by a hash of
judge model, prompt version, instruction, input and both outputs in order), so rerunning,
or judging the same outputs against another table column, costs nothing for pairs already
judged.

Output files of AlpaCare's release differ in schema: ``output`` (gpt-4, gpt-3.5-turbo,
text-davinci-003), ``response`` (claude-2), a Human/Assistant ``prompt`` instead of
instruction/input (claude-2 on iCliniq), one column per model (MedInstruct-test.jsonl).
``load_outputs`` reads them all as they are.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .client import Completion
from .errors import DataError
from .prompts import JUDGE_PROMPT_VERSION, NO_INPUT, judge_messages
from .runner import Job, RunSettings, RunSummary, run_jobs
from .store import JsonlStore, read_records, write_json_atomic

OUTPUT_FIELDS = ("output", "response", "completion", "answer")
_CLAUDE_PROMPT = re.compile(r"^\s*Human:\s*(?P<header>.*?)\n\n(?P<question>.*?)\s*(?:\n\s*)?Assistant:\s*$", re.DOTALL)


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    index: int  # position in its file
    id: str | None = None


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _text_key(instruction: str, inp: str) -> str:
    """Instruction and input as one normalised string: ("", q) and (q, "") match."""
    inp = "" if inp.strip() == NO_INPUT else inp
    return _norm(f"{instruction} {inp}")


def load_outputs(path: str | Path, field: str | None = None) -> list[Example]:
    """Read model or reference outputs in any of the schemas described in the module docstring."""
    records = read_records(path)
    out = []
    for i, r in enumerate(records):
        if field is not None:
            if field not in r:
                raise DataError(path, i, field, "missing (the output field named by --*-field)")
            output = r[field]
        else:
            name = next((f for f in OUTPUT_FIELDS if f in r), None)
            if name is None:
                raise DataError(path, i, "output", f"none of {OUTPUT_FIELDS} present; pass the field name")
            output = r[name]
        if not isinstance(output, str):
            raise DataError(path, i, field or "output", f"expected a string, got {type(output).__name__}")
        if "instruction" in r or "input" in r:
            instruction, inp = r.get("instruction") or "", r.get("input") or ""
        elif "prompt" in r:
            m = _CLAUDE_PROMPT.match(r["prompt"])
            if not m:
                raise DataError(path, i, "prompt", "not in the 'Human: ...\\n\\n<question>\\nAssistant:' form")
            instruction, inp = "", m.group("question")
        else:
            raise DataError(path, i, "instruction", "missing (and no 'prompt' field either)")
        if not isinstance(instruction, str) or not isinstance(inp, str):
            raise DataError(path, i, "instruction", "instruction and input must be strings")
        rid = r.get("id")
        out.append(Example(instruction=instruction, input=inp, output=output, index=i,
                           id=None if rid is None else str(rid)))
    return out


def match_examples(model: list[Example], reference: list[Example], model_path: object,
                   reference_path: object) -> list[tuple[Example, Example]]:
    """Pair each model example with its reference example.

    By instruction+input text first (repeated texts pair up in order); failing that, by
    ``id`` as a position in the reference file when that reference's text is contained in
    the model's (e.g. the model saw an extra header). Otherwise a ``DataError`` names the record.
    """
    by_text: dict[str, list[Example]] = {}
    for r in reference:
        by_text.setdefault(_text_key(r.instruction, r.input), []).append(r)
    used: set[int] = set()
    pairs = []
    for m in model:
        key = _text_key(m.instruction, m.input)
        candidates = [r for r in by_text.get(key, []) if r.index not in used]
        ref = candidates[0] if candidates else None
        if ref is None and m.id is not None and m.id.isdigit() and int(m.id) < len(reference):
            r = reference[int(m.id)]
            rkey = _text_key(r.instruction, r.input)
            if r.index not in used and rkey and (rkey in key or key in rkey):
                ref = r
        if ref is None:
            raise DataError(model_path, m.index, "instruction",
                            f"matches no (unused) reference record in {reference_path} "
                            f"(instruction+input starts {key[:80]!r})")
        used.add(ref.index)
        pairs.append((m, ref))
    return pairs


def parse_verdict(text: str) -> str | None:
    """'a', 'b', 'tie' or None (unparseable) from a judge's reply.

    Accepts "Output (a)", "(b)", "Output B", "**Output (a)**", "Tie", "Verdict: b" and a
    first line that decides; a reply naming both outputs without deciding is unparseable.
    """
    def decide(s: str) -> str | None:
        s = s.lower().replace("*", "").strip()
        found = set(re.findall(r"\boutput\s*\(?\s*([ab])\s*\)?(?![a-z])", s))
        found |= set(re.findall(r"(?:^|\s)\(([ab])\)", s))
        if re.search(r"\btie\b|\bequally\b", s):
            found.add("tie")
        if not found:
            m = re.fullmatch(r"(?:verdict|answer|winner|better)?\s*[:\-]?\s*([ab])[.!]?", s)
            if m:
                found.add(m.group(1))
        return found.pop() if len(found) == 1 else None

    text = text.strip()
    if not text:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    return decide(lines[0]) or decide(lines[-1]) or decide(text)


SCORES = {("model_first", "a"): 1.0, ("model_first", "b"): 0.0, ("reference_first", "a"): 0.0,
          ("reference_first", "b"): 1.0, ("model_first", "tie"): 0.5, ("reference_first", "tie"): 0.5}


@dataclass(frozen=True)
class WinRate:
    """Win rate of the model over the reference, in percent (ties count half)."""

    win_rate: float
    stderr: float
    n_examples: int
    n_judgements: int
    n_unparseable: int
    wins: int
    ties: int
    losses: int


def win_rate(annotations: list[dict]) -> WinRate:
    """Compute the win rate from annotations ``{"example": k, "order": ..., "verdict": a|b|tie|None}``.

    ``order`` is ``model_first`` (the model's output was Output (a)) or ``reference_first``.
    Unparseable verdicts (None) are counted in ``n_unparseable`` and excluded from the rate.
    """
    per_example: dict[object, list[float]] = {}
    wins = ties = losses = bad = 0
    for a in annotations:
        if a["verdict"] is None:
            bad += 1
            continue
        s = SCORES[(a["order"], a["verdict"])]
        wins += s == 1.0
        ties += s == 0.5
        losses += s == 0.0
        per_example.setdefault(a["example"], []).append(s)
    means = [sum(v) / len(v) for v in per_example.values()]
    n = len(means)
    rate = sum(means) / n if n else float("nan")
    # examples whose two orders both parsed weigh the same as those with one: the rate is over examples
    stderr = (math.sqrt(sum((x - rate) ** 2 for x in means) / (n - 1)) / math.sqrt(n)) if n > 1 else float("nan")
    return WinRate(win_rate=100 * rate, stderr=100 * stderr, n_examples=n, n_judgements=len(annotations),
                   n_unparseable=bad, wins=wins, ties=ties, losses=losses)


@dataclass(frozen=True)
class JudgeConfig:
    model: str = "gpt-3.5-turbo"
    temperature: float = 0.0
    max_tokens: int = 32


def annotation_id(cfg: JudgeConfig, ex: Example, output_a: str, output_b: str) -> str:
    h = hashlib.sha256("\x00".join([cfg.model, JUDGE_PROMPT_VERSION, ex.instruction, ex.input, output_a,
                                    output_b]).encode()).hexdigest()
    return f"judge-{h[:32]}"


@dataclass
class Comparison:
    """One (model outputs, reference outputs) pair: a cell of the results table."""

    model_outputs: Path
    reference_outputs: Path
    model_name: str
    reference_name: str
    test_set: str
    pairs: list[tuple[Example, Example]]


def infer_test_set(path: Path) -> str:
    name = path.name.lower()
    if "icliniq" in name:
        return "iCliniq"
    if "medsi" in name or "medinstruct" in name:
        return "MedInstruct-test"
    return path.stem


def jobs_for(comp: Comparison, cfg: JudgeConfig) -> list[tuple[Job, int, str]]:
    """(job, example index, order) for both orders of every example."""
    out = []
    for k, (m, r) in enumerate(comp.pairs):
        for order, (a, b) in (("model_first", (m.output, r.output)), ("reference_first", (r.output, m.output))):
            body = {"model": cfg.model, "messages": judge_messages(r.instruction, r.input, a, b),
                    "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
            out.append((Job(request_id=annotation_id(cfg, r, a, b), body=body), k, order))
    return out


def to_record(job: Job, completion: Completion, can_retry: bool) -> dict:
    return {"request_id": job.request_id, "verdict": parse_verdict(completion.content), "raw": completion.content,
            "judge_model": completion.model, "prompt_version": JUDGE_PROMPT_VERSION,
            "finish_reason": completion.finish_reason, "usage": completion.usage()}


def summarize(comp: Comparison, cfg: JudgeConfig, store: JsonlStore) -> dict:
    """The machine-readable summary of one comparison (None verdicts for pairs not yet judged)."""
    annotations, missing = [], 0
    for job, k, order in jobs_for(comp, cfg):
        rec = store.get(job.request_id)
        if rec is None:
            missing += 1
            continue
        annotations.append({"example": k, "order": order, "verdict": rec["verdict"]})
    wr = win_rate(annotations)
    return {"model": comp.model_name, "reference_model": comp.reference_name, "test_set": comp.test_set,
            "model_outputs": str(comp.model_outputs), "reference_outputs": str(comp.reference_outputs),
            "judge_model": cfg.model, "prompt_version": JUDGE_PROMPT_VERSION, **asdict(wr),
            "n_missing": missing, "complete": missing == 0, "annotations": annotations}


def build_comparison(outputs: Path, reference: Path, *, output_field: str | None = None,
                     reference_field: str | None = None, model_name: str | None = None,
                     reference_name: str | None = None, test_set: str | None = None) -> Comparison:
    model_ex = load_outputs(outputs, output_field)
    ref_ex = load_outputs(reference, reference_field)
    if model_name is None:
        gens = {r.get("generator") for r in read_records(outputs) if r.get("generator")}
        model_name = gens.pop() if len(gens) == 1 else outputs.stem
    return Comparison(model_outputs=outputs, reference_outputs=reference, model_name=model_name,
                      reference_name=reference_name or reference_field or reference.parent.name,
                      test_set=test_set or infer_test_set(reference),
                      pairs=match_examples(model_ex, ref_ex, outputs, reference))


def run_judge(comparisons: list[Comparison], cfg: JudgeConfig, settings: RunSettings, annotations: Path,
              summary_dir: Path) -> tuple[RunSummary, list[dict]]:
    """Judge every comparison (sharing one annotation cache) and write one summary JSON per comparison."""
    jobs: dict[str, Job] = {}
    for comp in comparisons:
        for job, _, _ in jobs_for(comp, cfg):
            jobs.setdefault(job.request_id, job)
    with JsonlStore(annotations) as store:
        run = run_jobs(list(jobs.values()), store, to_record, settings, desc="judge")
        summaries = []
        for comp in comparisons:
            s = summarize(comp, cfg, store)
            path = summary_dir / f"winrate__{_slug(s['model'])}__vs__{_slug(s['reference_model'])}__{_slug(s['test_set'])}.json"
            write_json_atomic(path, s)
            s["summary_file"] = str(path)
            summaries.append(s)
    return run, summaries


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
