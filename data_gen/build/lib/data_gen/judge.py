"""``judge``: pairwise LLM-as-judge of model outputs against reference outputs.

For every example the judge sees the model's output and the reference output twice, once
in each order (position bias cancels out), and answers ``Output (a)``, ``Output (b)`` or
``Tie``. A win counts 1, a tie 0.5, a loss 0; the win rate is the mean over examples of
the mean of their parsed judgements, and its standard error is computed over per-example
means (the two orders of one example are not independent).

Nothing changes the number silently. Verdicts that cannot be parsed are counted and
reported; replies cut off by ``max_tokens`` are never parsed but asked again with twice the
tokens, and counted apart if still cut at the cap (below it they are pending: a rerun asks
them); reference examples the model outputs do not answer are counted, listed and make the
comparison incomplete; ``JudgeResult.check`` turns all of that into one exit status, the same
for every command that reports win rates. Each comparison's summary has a file of its own.

Every verdict is stored in an annotation cache (an append-only JSONL keyed by a hash of
judge model, prompt version, instruction, input and both outputs in order), so rerunning,
or judging the same outputs against another table column, costs nothing for pairs already
judged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .client import Completion
from .errors import DataError, JudgeIncomplete
from .outputs import Example, load_outputs, text_key
from .prompts import JUDGE_PROMPT_VERSION, judge_messages
from .runner import Job, MaxTokensGrowth, RunSettings, RunSummary, is_truncated, run_jobs
from .store import JsonlStore, read_records, write_json_atomic

log = logging.getLogger(__name__)

SUMMARY_GLOB = "winrate__*.json"  # what summary_path names: the summaries of a folder


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

    @property
    def growth(self) -> MaxTokensGrowth:
        return MaxTokensGrowth(max(self.max_tokens, self.max_tokens_cap))


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
    n_reference: int  # reference examples expected to be answered (the file's, or its first reference_limit)


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


def _comparison(outputs: Path, reference: Path, matching: Matching, n_reference: int, model_name: str,
                reference_name: str, test_set: str, reference_limit: int | None) -> Comparison:
    if matching.unmatched:
        m = matching.unmatched[0]
        raise DataError(outputs, m.index, "instruction",
                        f"matches no (unused) reference record in {reference} "
                        f"(instruction+input starts {text_key(m.instruction, m.input)[:80]!r})")
    pairs, missing = matching.pairs, matching.missing
    if reference_limit is not None:  # a run over the first examples only: the others are not expected
        pairs = [(m, r) for m, r in pairs if r.index < reference_limit]
        missing = [r for r in missing if r.index < reference_limit]
        n_reference = min(n_reference, reference_limit)
    return Comparison(model_outputs=outputs, reference_outputs=reference, model_name=model_name,
                      reference_name=reference_name, test_set=test_set, pairs=pairs, missing=missing,
                      n_reference=n_reference)


def build_comparisons(outputs: Sequence[Path], references: Sequence[Path], *, test_sets: Sequence[str] | None = None,
                      output_field: str | None = None, reference_field: str | None = None,
                      model_name: str | None = None, reference_name: str | None = None,
                      reference_limit: int | None = None, allow_missing: bool = False) -> list[Comparison]:
    """Pair every outputs file with each reference file whose questions it answers, by content.

    A reference answers an outputs file when most of its records match (instruction + input),
    so file names do not matter: AlpaCare's ``<model>/medinstruct/seed_0.json`` pairs with
    ``gpt-4/medsi_output.jsonl``. ``test_sets`` names the test set of each reference (one name
    for all, or one per reference); by default it comes from the reference's file or folder name.
    ``reference_limit``: only the first N examples of each reference are expected (a smoke run).
    An outputs file that answers no reference is a ``DataError``, and so is a reference file that
    no outputs file answers unless ``allow_missing`` (then it is only reported): nothing is ever
    left out silently.
    """
    if test_sets is not None and len(test_sets) not in (1, len(references)):
        raise DataError("--test_set", None, None, f"give one name, or one per reference file "
                                                  f"({len(references)}), not {len(test_sets)}")
    names = [None] * len(references) if test_sets is None else (
        list(test_sets) * len(references) if len(test_sets) == 1 else list(test_sets))
    refs = [(path, load_outputs(path, reference_field)) for path in references]
    comparisons = []
    best_answer: dict[Path, tuple[int, Path | None]] = {path: (0, None) for path in references}
    for out in outputs:
        model_ex = load_outputs(out, output_field)
        if not model_ex:
            raise DataError(out, None, None, "no records")
        name = model_name or default_model_name(out, read_records(out))
        matched = []
        for (ref_path, ref_ex), test_set in zip(refs, names):
            matching = match_examples(model_ex, ref_ex)
            matched.append((len(matching.pairs), ref_path))
            best_answer[ref_path] = max(best_answer[ref_path], (len(matching.pairs), out), key=lambda x: x[0])
            if 2 * len(matching.pairs) > len(model_ex):
                comparisons.append(_comparison(
                    out, ref_path, matching, len(ref_ex), name,
                    reference_name or reference_field or ref_path.parent.name, test_set or infer_test_set(ref_path),
                    reference_limit))
        if not any(c.model_outputs == out for c in comparisons):
            best, best_ref = max(matched, key=lambda x: x[0])
            raise DataError(out, None, None, f"answers none of the reference sets: at most {best} of its "
                                             f"{len(model_ex)} records match one ({best_ref})")
    for (ref_path, ref_ex) in refs:
        if any(c.reference_outputs == ref_path for c in comparisons):
            continue
        best, best_out = best_answer[ref_path]
        answered = (f"at most {best} of its {len(ref_ex)} records are answered by one, {best_out}" if best
                    else f"none of its {len(ref_ex)} records is answered")
        problem = f"no outputs file answers this reference set ({answered})"
        if not allow_missing:
            raise DataError(ref_path, None, None, f"{problem}; pass --allow_missing to judge without it")
        log.warning("%s: %s; left out (--allow_missing)", ref_path, problem)
    return comparisons


def jobs_for(comp: Comparison, cfg: JudgeConfig) -> list[tuple[Job, int, str]]:
    """(job, reference example index, order) for both orders of every example."""
    out = []
    for m, r in comp.pairs:
        for order, (a, b) in (("model_first", (m.output, r.output)), ("reference_first", (r.output, m.output))):
            body = {"model": cfg.model, "messages": judge_messages(r.instruction, r.input, a, b),
                    "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
            out.append((Job(request_id=annotation_id(cfg, r, a, b), body=body), r.index, order))
    return out


def to_record(job: Job, completion: Completion) -> dict:
    """A verdict; one cut off by ``max_tokens`` is never parsed (a cut "Both Output (a) and Ou" is no verdict)."""
    truncated = completion.finish_reason == "length"
    return {"request_id": job.request_id, "verdict": None if truncated else parse_verdict(completion.content),
            "raw": completion.content, "judge_model": completion.model, "prompt_version": JUDGE_PROMPT_VERSION,
            "finish_reason": completion.finish_reason, "max_tokens": int(job.body["max_tokens"]),
            "usage": completion.usage()}


@dataclass(frozen=True)
class Summary:
    """The result of one comparison: what its ``winrate__*.json`` holds, and what a user must see.

    ``win_rate``/``stderr`` are over the ``n_examples`` reference examples with a scored verdict.
    The others are accounted for: ``n_missing`` reference examples have no model output
    (``missing_ids``: their ``id``, or position in the reference file); ``n_truncated`` (cut off at
    the cap) and ``n_unparseable`` verdicts were received but not scored; ``n_pending`` are not
    final yet (failed requests, budget, or cut off below the cap: a rerun asks them).
    ``complete``: nothing missing or pending. ``summary_id`` tells apart the comparisons whose
    names agree (two outputs files of one model, two reference folders of one name).
    """

    model: str
    reference_model: str
    test_set: str
    model_outputs: str
    reference_outputs: str
    judge_model: str
    prompt_version: str
    summary_id: str
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

    @property
    def title(self) -> str:
        return f"{self.model} vs {self.reference_model} on {self.test_set}"

    def line(self) -> str:
        """One line per comparison, so a user sees at a glance whether the number can be trusted."""
        return (f"{self.title}: win rate {self.win_rate:.1f} +- {self.stderr:.1f} | reference examples: "
                f"{self.n_examples} judged of {self.n_reference}, {self.n_missing} missing | verdicts: "
                f"{self.n_truncated} truncated, {self.n_unparseable} unparseable, {self.n_pending} pending")


def summary_id(comp: Comparison, cfg: JudgeConfig) -> str:
    """Stable for one comparison (the two files where they are, the judge), distinct for any two others."""
    parts = [str(Path(comp.model_outputs).resolve()), str(Path(comp.reference_outputs).resolve()), cfg.model]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:10]


def summarize(comp: Comparison, cfg: JudgeConfig, store: JsonlStore) -> Summary:
    """The summary of one comparison from the annotation cache (verdicts not final there are pending)."""
    annotations, pending = [], 0
    for job, k, order in jobs_for(comp, cfg):
        rec = store.get(job.request_id)
        if rec is None or not cfg.growth.is_final(rec):
            pending += 1
            continue
        truncated = is_truncated(rec)
        annotations.append({"example": k, "order": order, "verdict": None if truncated else rec["verdict"],
                            "truncated": truncated})
    wr = win_rate(annotations)
    return Summary(model=comp.model_name, reference_model=comp.reference_name, test_set=comp.test_set,
                   model_outputs=str(comp.model_outputs), reference_outputs=str(comp.reference_outputs),
                   judge_model=cfg.model, prompt_version=JUDGE_PROMPT_VERSION, summary_id=summary_id(comp, cfg),
                   win_rate=wr.win_rate, stderr=wr.stderr, n_reference=comp.n_reference, n_examples=wr.n_examples,
                   n_missing=len(comp.missing), missing_ids=[r.label for r in comp.missing],
                   n_judgements=wr.n_judgements, n_unparseable=wr.n_unparseable, n_truncated=wr.n_truncated,
                   n_pending=pending, wins=wr.wins, ties=wr.ties, losses=wr.losses,
                   complete=not comp.missing and pending == 0, annotations=annotations)


def summary_path(summary_dir: Path, s: Summary) -> Path:
    """``winrate__<model>__vs__<reference>__<test set>__<summary_id>.json``: readable, and one file per comparison."""
    return summary_dir / (f"winrate__{_slug(s.model)}__vs__{_slug(s.reference_model)}__{_slug(s.test_set)}"
                          f"__{s.summary_id}.json")


def read_summaries(summary_dir: Path, judge_model: str | None = None) -> list[dict]:
    """The summaries in ``summary_dir`` (of ``judge_model`` only, if given), in file name order.

    Two summaries of one (model, reference model, test set, judge) from different files would
    be two numbers for one table cell: a ``DataError`` naming both, never one silently chosen.
    """
    summaries, seen = [], {}
    for path in sorted(Path(summary_dir).glob(SUMMARY_GLOB)):
        s = json.loads(path.read_text(encoding="utf-8"))
        if judge_model is not None and s.get("judge_model") != judge_model:
            continue
        cell = (s.get("model"), s.get("reference_model"), s.get("test_set"), s.get("judge_model"))
        if cell in seen:
            raise DataError(path, None, None, f"a second win rate of {cell[0]} vs {cell[1]} on {cell[2]} "
                                              f"(judge {cell[3]}) beside {seen[cell].name}, from other files: remove "
                                              "the stale one, or give the models distinct names")
        seen[cell] = path
        summaries.append(s)
    return summaries


@dataclass(frozen=True)
class JudgeResult:
    """What ``run_judge`` did: the run's accounting and one summary per comparison."""

    run: RunSummary
    summaries: list[Summary]

    def check(self, *, allow_missing: bool = False) -> None:
        """Raise ``JudgeIncomplete`` (with the exit status) unless every win rate can be taken as it is.

        Unfinished (failed requests, budget) or a comparison without a single scored verdict: status 1,
        never success having judged nothing; reference examples missing from the model outputs:
        status 3 unless ``allow_missing``.
        """
        status, reasons = 0, []
        if not self.summaries:
            status, reasons = 1, ["nothing to judge"]
        if not self.run.finished:
            status = 1
            reasons.append("unfinished (failed requests, budget or cut-off verdicts): rerun the same command to "
                           "finish")
        empty = [s.title for s in self.summaries if s.n_examples == 0]
        if empty:
            status = 1
            reasons.append(f"no scored verdict at all, so no win rate, for {', '.join(empty)}")
        if any(s.n_missing for s in self.summaries) and not allow_missing:
            status = status or 3
            reasons.append("reference examples are missing from the model outputs (the win rates are over the "
                           "others); pass --allow_missing to accept that")
        if status:
            raise JudgeIncomplete(status, "; ".join(reasons))


def run_judge(comparisons: Sequence[Comparison], cfg: JudgeConfig, settings: RunSettings, annotations: Path,
              summary_dir: Path) -> JudgeResult:
    """Judge every comparison (sharing one annotation cache) and write one summary JSON per comparison.

    Live, a truncated verdict is asked again at once with doubled ``max_tokens``; with the Batch
    API each doubling is another batch round (``runner.run_jobs``, one budget for all of them).
    Reference examples without a model output are logged, by id, for every comparison.
    """
    with JsonlStore(annotations, superseding=True) as store:
        jobs = {job.request_id: job for comp in comparisons for job, _, _ in jobs_for(comp, cfg)}
        run = run_jobs(list(jobs.values()), store, to_record, settings, desc="judge", growth=cfg.growth)
        summaries = [summarize(comp, cfg, store) for comp in comparisons]
    for s in summaries:
        write_json_atomic(summary_path(summary_dir, s), s.to_dict())
        if s.n_missing:
            shown = ", ".join(s.missing_ids[:20]) + (", ..." if s.n_missing > 20 else "")
            log.warning("%s: %d of %d reference examples have no model output (ids: %s)", s.title, s.n_missing,
                        s.n_reference, shown)
    return JudgeResult(run=run, summaries=summaries)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
