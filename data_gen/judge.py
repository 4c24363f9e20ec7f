"""``judge``: pairwise LLM-as-judge of model outputs against reference outputs.

For every example the judge sees the model's output and the reference output twice, once
in each order (position bias cancels out), and answers ``Output (a)``, ``Output (b)`` or
``Tie``. A win counts 1, a tie 0.5, a loss 0; the win rate is the mean over examples of
the mean of their parsed judgements, and its standard error is computed over per-example
means (the two orders of one example are not independent).

Nothing changes the number silently. Verdicts that cannot be parsed are counted and
reported; replies cut off by ``max_tokens`` are never parsed but asked again with twice the
tokens, and counted apart if still cut at the cap; reference examples the model outputs do
not answer are counted, listed and make the comparison incomplete.

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
from .runner import Job, Retry, RunSettings, RunSummary, run_jobs
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

    @property
    def label(self) -> str:
        """How a summary names this example: its ``id``, else its position in the file."""
        return self.id if self.id is not None else str(self.index)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def text_key(instruction: str, inp: str) -> str:
    """Instruction and input as one normalised string, the key that pairs two files' answers to one task.

    Case and whitespace are ignored, ``<noinput>`` means no input, and ("", q) and (q, "") match.
    """
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


@dataclass(frozen=True)
class Matching:
    """How the examples of a model-outputs file line up with those of a reference file."""

    pairs: list[tuple[Example, Example]]  # (model example, reference example), in model order
    unmatched: list[Example]  # model examples that answer no reference example
    missing: list[Example]  # reference examples no model example answers


def match_examples(model: list[Example], reference: list[Example]) -> Matching:
    """Pair each model example with the reference example it answers, by content.

    By instruction+input text first (repeated texts pair up in order); failing that, by the
    reference at position ``id`` when one text contains the other, else by the longest
    reference text contained in the model's. The model may have seen an extra header:
    AlpaCare's iCliniq outputs carry "If you are a doctor, ..." as the instruction and the
    question as input, where the reference files have only the question.
    """
    by_text: dict[str, list[Example]] = {}
    for r in reference:
        by_text.setdefault(text_key(r.instruction, r.input), []).append(r)
    used: set[int] = set()
    found: dict[int, Example] = {}  # model position -> reference example
    for i, m in enumerate(model):
        ref = next((r for r in by_text.get(text_key(m.instruction, m.input), []) if r.index not in used), None)
        if ref is not None:
            used.add(ref.index)
            found[i] = ref
    ref_keys = [(text_key(r.instruction, r.input), r) for r in reference]
    most_specific_first = sorted(ref_keys, key=lambda kr: -len(kr[0]))
    for i, m in enumerate(model):
        if i in found:
            continue
        key = text_key(m.instruction, m.input)
        ref = None
        if m.id is not None and m.id.isdigit() and int(m.id) < len(reference):
            k, r = ref_keys[int(m.id)]
            if r.index not in used and k and (k in key or key in k):
                ref = r
        if ref is None:
            ref = next((r for k, r in most_specific_first if r.index not in used and k and k in key), None)
        if ref is not None:
            used.add(ref.index)
            found[i] = ref
    return Matching(pairs=[(model[i], found[i]) for i in sorted(found)],
                    unmatched=[m for i, m in enumerate(model) if i not in found],
                    missing=[r for r in reference if r.index not in used])


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
    n_examples: int  # examples with at least one scored verdict: the rate is over these
    n_judgements: int  # verdicts received, scored or not
    n_unparseable: int
    n_truncated: int
    wins: int
    ties: int
    losses: int


def win_rate(annotations: list[dict]) -> WinRate:
    """Compute the win rate from annotations ``{"example": k, "order": ..., "verdict": a|b|tie|None}``.

    ``order`` is ``model_first`` (the model's output was Output (a)) or ``reference_first``.
    Verdicts cut off by ``max_tokens`` (``"truncated": true``, verdict None) are counted in
    ``n_truncated``, other unparseable ones (None) in ``n_unparseable``; both are excluded from the rate.
    """
    per_example: dict[object, list[float]] = {}
    wins = ties = losses = bad = truncated = 0
    for a in annotations:
        if a.get("truncated"):
            truncated += 1
            continue
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
                   n_unparseable=bad, n_truncated=truncated, wins=wins, ties=ties, losses=losses)


@dataclass(frozen=True)
class JudgeConfig:
    model: str = "gpt-3.5-turbo"
    temperature: float = 0.0
    max_tokens: int = 32
    max_tokens_cap: int = 512  # a verdict cut off by max_tokens is asked again with twice as many, up to this


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
    pairs: list[tuple[Example, Example]]  # (model example, reference example)
    missing: list[Example]  # reference examples the model outputs do not answer
    n_reference: int  # examples in the reference file


def infer_test_set(path: Path) -> str:
    """The test set a reference file holds, from its name or its folder's (AlpaCare's names)."""
    for name in (path.name.lower(), path.parent.name.lower()):
        if "icliniq" in name:
            return "iCliniq"
        if "medsi" in name or "medinstruct" in name:
            return "MedInstruct-test"
    return path.stem


def default_model_name(path: Path, records: list[dict]) -> str:
    """The outputs' ``generator``, else ``<model>`` of AlpaCare's ``<model>/<test set>/seed_N.json``, else the stem."""
    gens = {r.get("generator") for r in records if r.get("generator")}
    if len(gens) == 1:
        return str(gens.pop())
    if re.fullmatch(r"seed_\d+", path.stem) and path.parent.parent.name:
        return path.parent.parent.name
    return path.stem


def _comparison(outputs: Path, model_ex: list[Example], reference: Path, matching: Matching, n_reference: int,
                model_name: str, reference_name: str, test_set: str) -> Comparison:
    if matching.unmatched:
        m = matching.unmatched[0]
        raise DataError(outputs, m.index, "instruction",
                        f"matches no (unused) reference record in {reference} "
                        f"(instruction+input starts {text_key(m.instruction, m.input)[:80]!r})")
    return Comparison(model_outputs=outputs, reference_outputs=reference, model_name=model_name,
                      reference_name=reference_name, test_set=test_set, pairs=matching.pairs,
                      missing=matching.missing, n_reference=n_reference)


def build_comparison(outputs: Path, reference: Path, *, output_field: str | None = None,
                     reference_field: str | None = None, model_name: str | None = None,
                     reference_name: str | None = None, test_set: str | None = None) -> Comparison:
    """The comparison of one model-outputs file with one reference file known to share its test set.

    Every model record must answer a reference example (else ``DataError``); reference examples
    without a model record are the comparison's ``missing`` ones.
    """
    model_ex = load_outputs(outputs, output_field)
    ref_ex = load_outputs(reference, reference_field)
    return _comparison(outputs, model_ex, reference, match_examples(model_ex, ref_ex), len(ref_ex),
                       model_name or default_model_name(outputs, read_records(outputs)),
                       reference_name or reference_field or reference.parent.name,
                       test_set or infer_test_set(reference))


def build_comparisons(outputs: list[Path], references: list[Path], *, test_sets: list[str] | None = None,
                      output_field: str | None = None, reference_field: str | None = None,
                      model_name: str | None = None, reference_name: str | None = None) -> list[Comparison]:
    """Pair every outputs file with each reference file whose questions it answers, by content.

    A reference answers an outputs file when most of its records match (instruction + input),
    so file names do not matter: AlpaCare's ``<model>/medinstruct/seed_0.json`` pairs with
    ``gpt-4/medsi_output.jsonl``. ``test_sets`` names the test set of each reference (one name
    for all, or one per reference); by default it comes from the reference's file or folder name.
    An outputs file that answers no reference is a ``DataError``: nothing is ever judged silently.
    """
    if test_sets is not None and len(test_sets) not in (1, len(references)):
        raise DataError("--test-set", None, None, f"give one name, or one per reference file "
                                                  f"({len(references)}), not {len(test_sets)}")
    names = [None] * len(references) if test_sets is None else (
        test_sets * len(references) if len(test_sets) == 1 else list(test_sets))
    refs = [(path, load_outputs(path, reference_field)) for path in references]
    comparisons = []
    for out in outputs:
        model_ex = load_outputs(out, output_field)
        if not model_ex:
            raise DataError(out, None, None, "no records")
        name = model_name or default_model_name(out, read_records(out))
        matched = []
        for (ref_path, ref_ex), test_set in zip(refs, names):
            matching = match_examples(model_ex, ref_ex)
            matched.append((len(matching.pairs), ref_path))
            if 2 * len(matching.pairs) > len(model_ex):
                comparisons.append(_comparison(
                    out, model_ex, ref_path, matching, len(ref_ex), name,
                    reference_name or reference_field or ref_path.parent.name,
                    test_set or infer_test_set(ref_path)))
        if not any(c.model_outputs == out for c in comparisons):
            best, best_ref = max(matched, key=lambda x: x[0])
            raise DataError(out, None, None, f"answers none of the reference sets: at most {best} of its "
                                             f"{len(model_ex)} records match one ({best_ref})")
    return comparisons


def jobs_for(comp: Comparison, cfg: JudgeConfig, max_tokens: dict[str, int] | None = None
             ) -> list[tuple[Job, int, str]]:
    """(job, reference example index, order) for both orders of every example.

    ``max_tokens`` gives the starting size per request id (more for a verdict that was cut off before).
    """
    out = []
    for m, r in comp.pairs:
        for order, (a, b) in (("model_first", (m.output, r.output)), ("reference_first", (r.output, m.output))):
            rid = annotation_id(cfg, r, a, b)
            body = {"model": cfg.model, "messages": judge_messages(r.instruction, r.input, a, b),
                    "temperature": cfg.temperature, "max_tokens": (max_tokens or {}).get(rid, cfg.max_tokens)}
            out.append((Job(request_id=rid, body=body), r.index, order))
    return out


def is_truncated(record: dict) -> bool:
    """A reply cut off by ``max_tokens``: its text is never parsed (a cut "Both Output (a) and Ou" is no verdict)."""
    return record.get("finish_reason") == "length"


def make_is_done(cfg: JudgeConfig):
    """A truncated verdict is final only once it was asked with ``max_tokens_cap`` (records of older
    versions, which parsed and cached truncated replies, have no ``max_tokens``: asked again)."""
    def is_done(record: dict) -> bool:
        return not is_truncated(record) or int(record.get("max_tokens") or 0) >= cfg.max_tokens_cap
    return is_done


def next_max_tokens(cfg: JudgeConfig, record: dict | None) -> int:
    """What to ask with next: twice what a stored truncated verdict was cut at, else ``cfg.max_tokens``."""
    if record is None or not is_truncated(record) or not record.get("max_tokens"):
        return cfg.max_tokens
    return max(cfg.max_tokens, min(cfg.max_tokens_cap, 2 * int(record["max_tokens"])))


def make_to_record(cfg: JudgeConfig):
    def to_record(job: Job, completion: Completion, can_retry: bool) -> dict | Retry:
        max_tokens = int(job.body["max_tokens"])
        truncated = completion.finish_reason == "length"
        if truncated and can_retry and max_tokens < cfg.max_tokens_cap:
            return Retry(body={**job.body, "max_tokens": min(cfg.max_tokens_cap, 2 * max_tokens)})
        return {"request_id": job.request_id, "verdict": None if truncated else parse_verdict(completion.content),
                "raw": completion.content, "judge_model": completion.model, "prompt_version": JUDGE_PROMPT_VERSION,
                "finish_reason": completion.finish_reason, "max_tokens": max_tokens, "usage": completion.usage()}
    return to_record


@dataclass(frozen=True)
class Summary:
    """The result of one comparison: what ``winrate__*.json`` holds, and what a user must see.

    ``win_rate``/``stderr`` are over the ``n_examples`` reference examples with a scored verdict.
    The others are accounted for: ``n_missing`` reference examples have no model output
    (``missing_ids``: their ``id``, or position in the reference file); ``n_truncated`` and
    ``n_unparseable`` verdicts were received but not scored; ``n_pending`` were not obtained
    (failed requests or budget: a rerun asks them). ``complete``: nothing missing or pending.
    """

    model: str
    reference_model: str
    test_set: str
    model_outputs: str
    reference_outputs: str
    judge_model: str
    prompt_version: str
    win_rate: float
    stderr: float
    n_reference: int
    n_examples: int
    n_missing: int
    missing_ids: list[str]
    n_judgements: int
    n_unparseable: int
    n_truncated: int
    n_pending: int
    wins: int
    ties: int
    losses: int
    complete: bool
    annotations: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line per comparison, so a user sees at a glance whether the number can be trusted."""
        return (f"{self.model} vs {self.reference_model} on {self.test_set}: win rate {self.win_rate:.1f} "
                f"+- {self.stderr:.1f} | reference examples: {self.n_examples} judged of {self.n_reference}, "
                f"{self.n_missing} missing | verdicts: {self.n_truncated} truncated, {self.n_unparseable} "
                f"unparseable, {self.n_pending} pending")


def summarize(comp: Comparison, cfg: JudgeConfig, store: JsonlStore) -> Summary:
    """The summary of one comparison from the annotation cache (verdicts not yet there are pending)."""
    annotations, pending = [], 0
    for job, k, order in jobs_for(comp, cfg):
        rec = store.get(job.request_id)
        if rec is None:
            pending += 1
            continue
        truncated = is_truncated(rec)
        annotations.append({"example": k, "order": order, "verdict": None if truncated else rec["verdict"],
                            "truncated": truncated})
    wr = win_rate(annotations)
    return Summary(model=comp.model_name, reference_model=comp.reference_name, test_set=comp.test_set,
                   model_outputs=str(comp.model_outputs), reference_outputs=str(comp.reference_outputs),
                   judge_model=cfg.model, prompt_version=JUDGE_PROMPT_VERSION, win_rate=wr.win_rate,
                   stderr=wr.stderr, n_reference=comp.n_reference, n_examples=wr.n_examples,
                   n_missing=len(comp.missing), missing_ids=[r.label for r in comp.missing],
                   n_judgements=wr.n_judgements, n_unparseable=wr.n_unparseable, n_truncated=wr.n_truncated,
                   n_pending=pending, wins=wr.wins, ties=wr.ties, losses=wr.losses,
                   complete=not comp.missing and pending == 0, annotations=annotations)


def summary_path(summary_dir: Path, s: Summary) -> Path:
    return summary_dir / f"winrate__{_slug(s.model)}__vs__{_slug(s.reference_model)}__{_slug(s.test_set)}.json"


def run_judge(comparisons: list[Comparison], cfg: JudgeConfig, settings: RunSettings, annotations: Path,
              summary_dir: Path) -> tuple[RunSummary, list[Summary]]:
    """Judge every comparison (sharing one annotation cache) and write one summary JSON per comparison.

    Live, a truncated verdict is asked again at once with doubled ``max_tokens``; with the Batch
    API each doubling is another batch round. Returns the run's accounting and the summaries.
    """
    is_done = make_is_done(cfg)
    with JsonlStore(annotations, superseding=True) as store:
        run: RunSummary | None = None
        while True:
            jobs: dict[str, Job] = {}
            for comp in comparisons:
                for job, _, _ in jobs_for(comp, cfg, {}):
                    if job.request_id not in jobs:
                        start = next_max_tokens(cfg, store.get(job.request_id))
                        jobs[job.request_id] = Job(job.request_id, {**job.body, "max_tokens": start})
            this = run_jobs(list(jobs.values()), store, make_to_record(cfg), settings, desc="judge", is_done=is_done)
            run = this if run is None else run.then(this)
            provisional = [rid for rid in jobs if rid in store and not is_done(store.get(rid))]
            if not (settings.batch_api and provisional and this.completed and this.finished):
                break  # live runs retry inline; each batch round doubles max_tokens, so this ends at the cap
        summaries = [summarize(comp, cfg, store) for comp in comparisons]
    for s in summaries:
        write_json_atomic(summary_path(summary_dir, s), s.to_dict())
    return run, summaries


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
