"""Command line: ``python -m data_gen {instructions,dedup,responses,judge,keywords,contexts} ...``.

The endpoint comes from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (or ``--base_url`` /
``--api_key``), so any OpenAI-compatible server works. Every API command resumes: rerun
the same command after a crash or Ctrl-C and it continues where it stopped. Flags are
spelled with underscores; the dashed spelling of older command lines (``--max-cost``) works too.
Exit status: 0 done, 1 unfinished (budget reached, failed requests, fatal API error; for
``judge`` also a comparison without any scored verdict), 2 bad input (including input paths
that are missing, directories or unreadable, and for ``judge`` a reference file that no
outputs file answers, without ``--allow_missing``), 3 (``judge``) reference examples missing
from the model outputs without ``--allow_missing``, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import contexts as ctx_mod
from . import instructions as instr_mod
from . import judge as judge_mod
from . import keywords as kw_mod
from . import responses as resp_mod
from .cli import add_client_flags, run_settings, silence_transport_logs, underscore_flags
from .errors import DataError, FatalAPIError, JudgeIncomplete
from .runner import RunSettings, RunSummary
from .store import write_json_atomic

log = logging.getLogger("data_gen")


def _api_options(p: argparse.ArgumentParser) -> None:
    add_client_flags(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def _settings(a: argparse.Namespace) -> RunSettings:
    return run_settings(a, progress=not a.no_progress)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_gen", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("instructions", help="generate new tasks from seed tasks")
    p.add_argument("--seeds", required=True, type=Path, help="seed tasks (med_seed.json format)")
    p.add_argument("--out", required=True, type=Path, help="append-only JSONL, one record per request")
    p.add_argument("--num_requests", type=int, required=True)
    d = instr_mod.GenerationConfig()
    p.add_argument("--tasks_per_request", type=int, default=d.tasks_per_request)
    p.add_argument("--seeds_per_request", type=int, default=d.seeds_per_request)
    p.add_argument("--model", default=d.model)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top_p", type=float, default=d.top_p)
    p.add_argument("--presence_penalty", type=float, default=d.presence_penalty)
    p.add_argument("--frequency_penalty", type=float, default=d.frequency_penalty)
    p.add_argument("--max_tokens", type=int, default=d.max_tokens)
    p.add_argument("--seed", type=int, default=d.seed, help="sampling of seed tasks per request")
    _api_options(p)

    p = sub.add_parser("dedup", help="drop near-duplicate instructions (ROUGE-L)")
    p.add_argument("--in", dest="inputs", required=True, type=Path, nargs="+",
                   help="generation stores (JSONL) or task lists (JSON/JSONL), read in this order")
    p.add_argument("--seeds", type=Path, help="seed tasks: candidates too similar to a seed are dropped")
    p.add_argument("--out", required=True, type=Path, help="kept tasks, JSON list")
    p.add_argument("--dropped", type=Path, help="JSONL of dropped tasks with the instruction each duplicated")
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--rule", choices=["keep-first", "all-vs-all"], default="keep-first",
                   help="all-vs-all reproduces AlpaCare's rule (both members of a pair dropped), for comparison")
    p.add_argument("--no_progress", action="store_true")

    p = sub.add_parser("responses", help="answer each instruction (MedInstruct-52k format)")
    p.add_argument("--in", dest="inputs", required=True, type=Path, help="tasks (JSON list or JSONL)")
    p.add_argument("--out", required=True, type=Path, help="append-only JSONL store, one record per instruction")
    p.add_argument("--export", type=Path, help="write the MedInstruct-52k-format JSON here when done")
    r = resp_mod.ResponseConfig()
    p.add_argument("--model", default=r.model)
    p.add_argument("--temperature", type=float, default=r.temperature)
    p.add_argument("--top_p", type=float, default=r.top_p)
    p.add_argument("--max_tokens", type=int, default=r.max_tokens)
    p.add_argument("--max_tokens_cap", type=int, default=r.max_tokens_cap,
                   help="truncated answers are retried with doubled max_tokens up to this")
    _api_options(p)

    p = sub.add_parser("judge", help="pairwise LLM judge: model outputs vs reference outputs")
    p.add_argument("--outputs", required=True, type=Path, nargs="+",
                   help="model outputs [{id,instruction,input,output,generator}]")
    p.add_argument("--reference", required=True, type=Path, nargs="+",
                   help="reference outputs (AlpaCare files as they are)")
    p.add_argument("--output_field", help="field holding the model's output (default: output/response/...)")
    p.add_argument("--reference_field", help="field holding the reference output, e.g. gpt-4-answer")
    p.add_argument("--model_name", help="default: the outputs' 'generator' field, else the file name")
    p.add_argument("--reference_name", help="default: the reference file's folder name (e.g. gpt-4)")
    p.add_argument("--test_set", nargs="+", help="the test set of each --reference file (one name for all, or one "
                   "each); default: from the file or folder name (iCliniq / MedInstruct-test)")
    p.add_argument("--allow_missing", action="store_true",
                   help="exit 0 even when reference examples (or whole --reference files) have no model "
                        "output; they are still listed")
    j = judge_mod.JudgeConfig()
    p.add_argument("--judge_model", default=j.model)
    p.add_argument("--judge_max_tokens", type=int, default=j.max_tokens)
    p.add_argument("--judge_max_tokens_cap", type=int, default=j.max_tokens_cap,
                   help="a verdict cut off by max_tokens is asked again with doubled max_tokens up to this")
    p.add_argument("--annotations", required=True, type=Path, help="annotation cache (JSONL), shared across runs")
    p.add_argument("--summary_dir", type=Path, help="where summaries go (default: next to --annotations)")
    _api_options(p)

    p = sub.add_parser("keywords", help="medical keywords of multiple-choice questions, locally (no network)")
    p.add_argument("--in", dest="inputs", required=True, type=Path,
                   help="questions: JSONL {id, question, options, answer?}, or MedQA / MedMCQA / HEAD-QA files")
    p.add_argument("--out", required=True, type=Path, help="JSONL {id, keywords, options, answer?, words_total, "
                   "words_kept, privacy_budget}")
    p.add_argument("--extractor", choices=["default", "scispacy"], default="default",
                   help="default: YAKE (no model download); scispacy: entities of --spacy_model (the paper's)")
    p.add_argument("--spacy_model", default="en_core_sci_sm")
    p.add_argument("--max_share", type=float, default=kw_mod.MAX_SHARE,
                   help="at most this share of a question's words become keywords")
    p.add_argument("--no_progress", action="store_true")

    p = sub.add_parser("contexts", help="LLM-written context per question from its keywords and options only")
    p.add_argument("--keywords", required=True, type=Path, help="the output of the keywords command")
    p.add_argument("--out", required=True, type=Path, help="append-only JSONL {id, overall_context, "
                   "option_contexts, preliminary_answer, model}; rejected replies go to <out>.rejected.jsonl")
    c = ctx_mod.ContextConfig()
    p.add_argument("--model", default=c.model)
    p.add_argument("--temperature", type=float, default=c.temperature)
    p.add_argument("--max_tokens", type=int, default=c.max_tokens)
    p.add_argument("--retry_rejected", action="store_true",
                   help="request again the questions whose replies were rejected (malformed or truncated)")
    _api_options(p)
    return ap


def _report(summary: RunSummary) -> int:
    print(summary.line(), file=sys.stderr)
    return 0 if summary.finished else 1


def cmd_instructions(a: argparse.Namespace) -> int:
    cfg = instr_mod.GenerationConfig(model=a.model, temperature=a.temperature, top_p=a.top_p,
                                     presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
                                     max_tokens=a.max_tokens, tasks_per_request=a.tasks_per_request,
                                     seeds_per_request=a.seeds_per_request, seed=a.seed)
    summary, totals = instr_mod.generate(a.seeds, a.out, a.num_requests, cfg, _settings(a))
    print(json.dumps(totals), file=sys.stderr)
    return _report(summary)


def cmd_dedup(a: argparse.Namespace) -> int:
    # imported here, not at the top: rouge_score loads nltk, seconds that the API commands never need
    from . import dedup as dedup_mod

    tasks = [t for path in a.inputs for t in instr_mod.flatten_tasks(path)]
    for i, t in enumerate(tasks):
        if not isinstance(t.get("instruction"), str):
            raise DataError(a.inputs[0] if len(a.inputs) == 1 else "inputs", i, "instruction",
                            "missing or not a string")
    seeds = instr_mod.load_seed_tasks(a.seeds) if a.seeds else []
    seed_texts = [str(s["instruction"]) for s in seeds]
    res = dedup_mod.deduplicate([t["instruction"] for t in tasks], seed_texts, a.threshold, a.rule,
                                progress=not a.no_progress)
    write_json_atomic(a.out, [tasks[i] for i in res.kept])
    if a.dropped:
        a.dropped.parent.mkdir(parents=True, exist_ok=True)
        with a.dropped.open("w", encoding="utf-8") as f:
            for d in res.dropped:
                other = (seed_texts[d["duplicate_of"]] if d["duplicate_of_seed"]
                         else tasks[d["duplicate_of"]]["instruction"])
                f.write(json.dumps({**d, "instruction": tasks[d["index"]]["instruction"],
                                    "duplicate_of_instruction": other}, ensure_ascii=False) + "\n")
    print(json.dumps(res.stats), file=sys.stderr)
    return 0


def cmd_responses(a: argparse.Namespace) -> int:
    cfg = resp_mod.ResponseConfig(model=a.model, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens,
                                  max_tokens_cap=a.max_tokens_cap)
    summary, counts = resp_mod.generate(a.inputs, a.out, cfg, _settings(a), export=a.export)
    if counts:
        print(json.dumps(counts), file=sys.stderr)
    return _report(summary)


def cmd_judge(a: argparse.Namespace) -> int:
    comps = judge_mod.build_comparisons(
        a.outputs, a.reference, test_sets=a.test_set, output_field=a.output_field,
        reference_field=a.reference_field, model_name=a.model_name, reference_name=a.reference_name,
        allow_missing=a.allow_missing)
    cfg = judge_mod.JudgeConfig(model=a.judge_model, max_tokens=a.judge_max_tokens,
                                max_tokens_cap=a.judge_max_tokens_cap)
    summary_dir = a.summary_dir or a.annotations.parent
    result = judge_mod.run_judge(comps, cfg, _settings(a), a.annotations, summary_dir)
    print(result.run.line(), file=sys.stderr)
    for s in result.summaries:
        print(f"{s.line()} -> {judge_mod.summary_path(summary_dir, s)}")
    result.check(allow_missing=a.allow_missing)
    return 0


def cmd_keywords(a: argparse.Namespace) -> int:
    extractor = kw_mod.make_extractor(a.extractor, a.spacy_model)
    totals = kw_mod.run(a.inputs, a.out, extractor, a.max_share, progress=not a.no_progress)
    s = totals.summary()
    print(f"{s['questions']} questions: {s['words_kept']} of {s['words_total']} question words kept as keywords, "
          f"privacy budget {s['privacy_budget']:.1%} (per question in {a.out})", file=sys.stderr)
    print(json.dumps(s), file=sys.stderr)
    return 0


def cmd_contexts(a: argparse.Namespace) -> int:
    cfg = ctx_mod.ContextConfig(model=a.model, temperature=a.temperature, max_tokens=a.max_tokens)
    summary, counts = ctx_mod.generate(a.keywords, a.out, cfg, _settings(a), retry_rejected=a.retry_rejected)
    print(json.dumps(counts), file=sys.stderr)
    return _report(summary)


COMMANDS = {"instructions": cmd_instructions, "dedup": cmd_dedup, "responses": cmd_responses, "judge": cmd_judge,
            "keywords": cmd_keywords, "contexts": cmd_contexts}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(underscore_flags(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    silence_transport_logs()  # its debug lines show request details, even with -v
    try:
        return COMMANDS[args.command](args)
    except JudgeIncomplete as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the checks did not foresee (e.g. an output folder that is a file)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except FatalAPIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: everything finished so far is saved; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
