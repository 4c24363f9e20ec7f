"""The AlpaCare free-form evaluation (the paper's Table 1) in one command:

    python -m alpacare_jax.eval.judge_table --model=HF_DIR_OR_WORKDIR [--model=...] --data_dir=TFDS --out_dir=EVAL

For each model and test set (iCliniq, MedInstruct-test) it generates answers (`alpacare_jax.infer.generate`),
has the LLM judge compare them with each reference model's answers (gpt-4, gpt-3.5-turbo,
text-davinci-003, claude-2; both orders, ties half, `data_gen.judge`), and prints the win-rate table:
one row per model, one column per (test set, reference model) plus each test set's average.

Everything is cached under EVAL, so a rerun (after a crash, or with another --model) only does what is
missing: `outputs/<model>/<test_set>.json` (resumable generation; a model with every answer written is
not even loaded), `references/<test_set>/<model>.json` (the references the TFDS test sets carry, in judge
format), `judge/annotations.jsonl` (every verdict) and `judge/winrate__*.json` (one summary per table
cell). The table shows every summary in `judge/` for the judge model, so models judged in earlier runs
(or with `python -m data_gen judge` directly, `--summary-dir=EVAL/judge`) appear as rows too.

The judge endpoint comes from OPENAI_BASE_URL / OPENAI_API_KEY (or --base_url / --api_key, which show in
`ps`: prefer the variables), so any OpenAI-compatible server can judge. The key is never logged or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_gen import judge as judge_lib
from data_gen.client import ClientConfig
from data_gen.errors import DataError, FatalAPIError
from data_gen.runner import RunSettings
from data_gen.store import write_json_atomic

from alpacare_jax.data.records import REFERENCE_MODELS
from alpacare_jax.infer.generate import (TEST_SETS, Task, add_model_flags, add_sampling_flags, answered_all,
                                   generate_outputs, load_test_set, sampling_from_args, setup_logging)

# How the paper (and the judge summaries) name the test sets; Table 1 lists iCliniq first.
TEST_SET_TITLES = {"icliniq": "iCliniq", "medinstruct_test": "MedInstruct-test"}
TABLE_ORDER = ("icliniq", "medinstruct_test")
SUMMARY_GLOB = "winrate__*.json"


@dataclasses.dataclass(frozen=True)
class EvalLayout:
    """Where everything lives under --out_dir."""

    root: Path

    def outputs(self, model: str, test_set: str) -> Path:
        return self.root / "outputs" / model / f"{test_set}.json"

    def reference(self, test_set: str, reference: str) -> Path:
        return self.root / "references" / test_set / f"{reference}.json"

    @property
    def judge_dir(self) -> Path:
        return self.root / "judge"

    @property
    def annotations(self) -> Path:
        return self.judge_dir / "annotations.jsonl"

    @property
    def table(self) -> Path:
        return self.root / "table.txt"


def write_references(tasks: Sequence[Task], layout: EvalLayout, test_set: str,
                     references: Iterable[str] = REFERENCE_MODELS) -> dict[str, Path]:
    """Each reference model's answers to `tasks` as a judge-readable outputs file."""
    paths = {}
    for reference in references:
        rows = [{"id": t.id, "instruction": t.instruction, "input": t.input, "output": t.references[reference],
                 "generator": reference} for t in tasks]
        paths[reference] = layout.reference(test_set, reference)
        write_json_atomic(paths[reference], rows)
    return paths


def ensure_test_set(name: str, data_dir: str | None, source: str | None) -> None:
    """Builds the TFDS test set from the AlpaCare data directory when it is missing and --source is given."""
    if source is None:
        return
    import tensorflow_datasets as tfds

    import alpacare_jax.data.medinstruct  # noqa: F401  (registers the builder)
    from alpacare_jax.data.build import DATASET_NAME, build_dataset

    if not tfds.builder(f"{DATASET_NAME}/{name}", data_dir=data_dir or None).is_prepared():
        if not data_dir:
            raise ValueError("--source needs --data_dir: where to build the test sets")
        build_dataset(name, source, data_dir)


# ---- the table ------------------------------------------------------------------------------------------

def read_summaries(judge_dir: Path, judge_model: str) -> list[dict]:
    summaries = []
    for path in sorted(judge_dir.glob(SUMMARY_GLOB)):
        summary = json.loads(path.read_text(encoding="utf-8"))
        if summary.get("judge_model") == judge_model:
            summaries.append(summary)
    return summaries


def format_table(summaries: Sequence[dict], test_sets: Sequence[str] = tuple(TEST_SET_TITLES[t] for t in TABLE_ORDER),
                 references: Sequence[str] = REFERENCE_MODELS) -> str:
    """Win rates (%) in the layout of the paper's Table 1: models down, test set x reference model across.

    A cell whose comparison is not complete (verdicts missing) is marked `*`; `-` means not judged.
    AVG is the mean over a test set's judged references.
    """
    cells = {(s["model"], s["test_set"], s["reference_model"]): s for s in summaries}
    models = list(dict.fromkeys(s["model"] for s in summaries))
    columns = [(t, r) for t in test_sets for r in (*references, "AVG")]
    rows: list[list[str]] = []
    incomplete = False
    for model in models:
        row = [model]
        for test_set in test_sets:
            rates = []
            for reference in references:
                summary = cells.get((model, test_set, reference))
                if summary is None or summary["n_examples"] == 0:
                    row.append("-")
                    continue
                rates.append(summary["win_rate"])
                mark = "" if summary["complete"] else "*"
                incomplete |= not summary["complete"]
                row.append(f"{summary['win_rate']:.1f}{mark}")
            row.append(f"{sum(rates) / len(rates):.1f}" if rates else "-")
        rows.append(row)
    header = ["Model", *(r for _, r in columns)]
    widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]
    group_starts = {i + 1 for i, (_, r) in enumerate(columns) if r == references[0]}
    lines, offsets = [], []
    for k, line in enumerate((header, *rows)):
        text = line[0].ljust(widths[0])
        for i in range(1, len(line)):
            text += " | " if i in group_starts else "   "
            if k == 0 and i in group_starts:
                offsets.append(len(text))
            text += line[i].rjust(widths[i])
        lines.append(text)
    titles = ""
    for offset, title in zip(offsets, test_sets):  # each test set's title above its first column
        titles = titles.ljust(offset) + title
    if incomplete:
        lines.append("* judging incomplete (verdicts missing): rerun to finish")
    return "\n".join([titles, *lines])


# ---- the recipe -----------------------------------------------------------------------------------------

def evaluate(args: argparse.Namespace) -> int:
    from alpacare_jax.infer.loading import load_model, model_name

    layout = EvalLayout(Path(args.out_dir))
    test_sets = [t.strip() for t in args.test_sets.split(",") if t.strip()]
    for test_set in test_sets:
        if test_set not in TEST_SETS:
            raise ValueError(f"--test_sets: unknown test set {test_set!r}; choose from {TEST_SETS}")
    references = [r.strip() for r in args.references.split(",") if r.strip()]
    for reference in references:
        if reference not in REFERENCE_MODELS:
            raise ValueError(f"--references: unknown reference model {reference!r}; choose from {REFERENCE_MODELS}")

    tasks = {}
    for test_set in test_sets:
        ensure_test_set(test_set, args.data_dir, args.source)
        tasks[test_set] = load_test_set(test_set, args.data_dir)[: args.limit]
    reference_files = {t: write_references(tasks[t], layout, t, references) for t in test_sets}

    sampling = sampling_from_args(args)
    model_names = []
    for model_path in args.model:
        name = model_name(model_path)
        if all(answered_all(layout.outputs(name, t), tasks[t]) for t in test_sets):
            model_names.append(name)
            print(f"{name}: every test set already answered (model not loaded)", flush=True)
            continue
        loaded = load_model(model_path, step=args.step, dtype=args.dtype)
        model_names.append(loaded.name)
        for test_set in test_sets:
            stats = generate_outputs(loaded, tasks[test_set], layout.outputs(loaded.name, test_set), sampling,
                                     batch_size=args.batch_size, progress=not args.no_progress)
            print(f"{loaded.name} on {TEST_SET_TITLES[test_set]}: {stats.line()}", flush=True)
        del loaded

    comparisons = [
        judge_lib.build_comparison(layout.outputs(name, t), reference_files[t][r], model_name=name,
                                   reference_name=r, test_set=TEST_SET_TITLES[t])
        for name in model_names for t in test_sets for r in references
    ]
    judge_config = judge_lib.JudgeConfig(model=args.judge_model)
    settings = RunSettings(client=ClientConfig(base_url=args.base_url, api_key=args.api_key,
                                               concurrency=args.concurrency, timeout=args.timeout,
                                               max_attempts=args.max_attempts),
                           max_cost=args.max_cost, progress=not args.no_progress)
    run, _ = judge_lib.run_judge(comparisons, judge_config, settings, layout.annotations, layout.judge_dir)
    print(f"judge: {run.line()}", file=sys.stderr)
    print_table(layout, args.judge_model)
    return 0 if run.finished else 1


def print_table(layout: EvalLayout, judge_model: str) -> None:
    table = format_table(read_summaries(layout.judge_dir, judge_model))
    text = f"Win rate (%) against each reference model, judged by {judge_model} (ties count half)\n{table}\n"
    layout.table.parent.mkdir(parents=True, exist_ok=True)
    layout.table.write_text(text, encoding="utf-8")
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alpacare_jax.eval.judge_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[],
                        help="HF model directory or training workdir (repeat for several models)")
    parser.add_argument("--out_dir", required=True, help="where outputs, verdicts, summaries and the table go")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory holding the test sets")
    parser.add_argument("--source", default=None,
                        help="AlpaCare data directory: build missing test sets from it into --data_dir first")
    parser.add_argument("--test_sets", default=",".join(TABLE_ORDER))
    parser.add_argument("--references", default=",".join(REFERENCE_MODELS))
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows of each test set")
    parser.add_argument("--table_only", action="store_true", help="print the table from --out_dir's summaries")
    parser.add_argument("--no_progress", action="store_true")
    add_model_flags(parser)
    add_sampling_flags(parser)
    judge = parser.add_argument_group("judge")
    judge.add_argument("--judge_model", default=judge_lib.JudgeConfig().model)
    judge.add_argument("--base_url", default=None, help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL)")
    judge.add_argument("--api_key", default=None, help="default: $OPENAI_API_KEY (prefer it: flags show in ps)")
    judge.add_argument("--concurrency", type=int, default=16)
    judge.add_argument("--timeout", type=float, default=120.0)
    judge.add_argument("--max_attempts", type=int, default=6)
    judge.add_argument("--max_cost", type=float, default=None, help="USD budget for the judge's requests")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.table_only:
            print_table(EvalLayout(Path(args.out_dir)), args.judge_model)
            return 0
        if not args.model:
            parser.error("--model is required (or --table_only)")
        return evaluate(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FatalAPIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
