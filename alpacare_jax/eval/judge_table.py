"""The AlpaCare free-form evaluation (the paper's Table 1) in one command:

    alpacare-eval judge_table --model=HF_DIR_OR_WORKDIR [--model=...] --data_dir=TFDS --out_dir=EVAL

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
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from alpacare_jax.data.records import REFERENCE_MODELS
from alpacare_jax.infer.cli import (
    DEFAULT_MAX_NEW_TOKENS,
    add_model_flags,
    add_sampling_flags,
    sampling_from_args,
    setup_logging,
)
from alpacare_jax.infer.generate import TEST_SETS, Task, answered_all, generate_outputs, load_test_set
from alpacare_jax.infer.loading import load_model, model_name
from alpacare_jax.model import SamplingConfig
from data_gen import (
    DataError,
    FatalAPIError,
    JudgeConfig,
    JudgeIncomplete,
    RunSettings,
    add_client_flags,
    build_comparisons,
    read_summaries,
    run_judge,
    run_settings,
    write_json_atomic,
)

# How the paper (and the judge summaries) name the test sets; Table 1 lists iCliniq first.
TEST_SET_TITLES = {"icliniq": "iCliniq", "medinstruct_test": "MedInstruct-test"}
TABLE_ORDER = ("icliniq", "medinstruct_test")


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
    # TFDS takes seconds to import: only when a test set may have to be built.
    import tensorflow_datasets as tfds

    from alpacare_jax.data.build import DATASET_NAME, build_dataset  # registers the builder too

    if not tfds.builder(f"{DATASET_NAME}/{name}", data_dir=data_dir or None).is_prepared():
        if not data_dir:
            raise ValueError("--source needs --data_dir: where to build the test sets")
        build_dataset(name, source, data_dir)


# ---- the table ------------------------------------------------------------------------------------------

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

def judge_table(models: Sequence[str | Path], out_dir: str | Path, *, judge: RunSettings,
                judge_model: str = JudgeConfig().model, data_dir: str | None = None, source: str | None = None,
                test_sets: Sequence[str] = TABLE_ORDER, references: Sequence[str] = REFERENCE_MODELS,
                limit: int | None = None, step: int | None = None, dtype: str | None = None,
                sampling: SamplingConfig | None = None, batch_size: int = 16, allow_missing: bool = False,
                progress: bool = True) -> None:
    """Answers, verdicts and the table for `models` under `out_dir` (see the module docstring).

    Raises `JudgeIncomplete` (with the exit status) when the table must not be taken as final.
    """
    layout = EvalLayout(Path(out_dir))
    for test_set in test_sets:
        if test_set not in TEST_SETS:
            raise ValueError(f"--test_sets: unknown test set {test_set!r}; choose from {TEST_SETS}")
    for reference in references:
        if reference not in REFERENCE_MODELS:
            raise ValueError(f"--references: unknown reference model {reference!r}; choose from {REFERENCE_MODELS}")

    tasks = {}
    for test_set in test_sets:
        ensure_test_set(test_set, data_dir, source)
        tasks[test_set] = load_test_set(test_set, data_dir)[:limit]
    reference_files = {t: write_references(tasks[t], layout, t, references) for t in test_sets}

    sampling = sampling or SamplingConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    model_names = []
    for model_path in models:
        name = model_name(model_path)
        if all(answered_all(layout.outputs(name, t), tasks[t]) for t in test_sets):
            model_names.append(name)
            print(f"{name}: every test set already answered (model not loaded)", flush=True)
            continue
        loaded = load_model(model_path, step=step, dtype=dtype)
        model_names.append(loaded.name)
        for test_set in test_sets:
            stats = generate_outputs(loaded, tasks[test_set], layout.outputs(loaded.name, test_set), sampling,
                                     batch_size=batch_size, progress=progress)
            print(f"{loaded.name} on {TEST_SET_TITLES[test_set]}: {stats.line()}", flush=True)
        del loaded

    comparisons = [
        comparison
        for name in model_names for t in test_sets for r in references
        for comparison in build_comparisons([layout.outputs(name, t)], [reference_files[t][r]], model_name=name,
                                            reference_name=r, test_sets=[TEST_SET_TITLES[t]])
    ]
    judged = run_judge(comparisons, JudgeConfig(model=judge_model), judge, layout.annotations, layout.judge_dir)
    print(f"judge: {judged.run.line()}", file=sys.stderr)
    print_table(layout, judge_model)
    judged.check(allow_missing=allow_missing)  # the same rules as `data_gen judge`, the same exit statuses


def print_table(layout: EvalLayout, judge_model: str) -> None:
    table = format_table(read_summaries(layout.judge_dir, judge_model))
    text = f"Win rate (%) against each reference model, judged by {judge_model} (ties count half)\n{table}\n"
    layout.table.parent.mkdir(parents=True, exist_ok=True)
    layout.table.write_text(text, encoding="utf-8")
    print(text, flush=True)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alpacare-eval judge_table",
                                     description=__doc__.split("\n\n")[0])
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
    judge.add_argument("--judge_model", default=JudgeConfig().model)
    judge.add_argument("--allow_missing", action="store_true",
                       help="exit 0 even when test-set rows have no answer (they are still listed)")
    add_client_flags(parser, "judge endpoint and client")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.table_only:
            print_table(EvalLayout(Path(args.out_dir)), args.judge_model)
            return 0
        if not args.model:
            parser.error("--model is required (or --table_only)")
        judge_table(args.model, args.out_dir, judge=run_settings(args, progress=not args.no_progress),
                    judge_model=args.judge_model, data_dir=args.data_dir, source=args.source,
                    test_sets=_names(args.test_sets), references=_names(args.references), limit=args.limit,
                    step=args.step, dtype=args.dtype, sampling=sampling_from_args(args), batch_size=args.batch_size,
                    allow_missing=args.allow_missing, progress=not args.no_progress)
        return 0
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FatalAPIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except JudgeIncomplete as e:
        print(f"error: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
