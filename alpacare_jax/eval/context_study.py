"""The contextual-prompting study: without vs with context, full and few-shot, mean and std over runs.

    python -m alpacare_jax.eval.context_study --config=configs/mcq_medqa.py --workdir=runs/medqa_study \
        --keywords=data/medqa/train_keywords.jsonl --contexts_train=data/medqa/train_contexts.jsonl \
        --contexts_eval=data/medqa/dev_contexts.jsonl --contexts_test=data/medqa/test_contexts.jsonl \
        --seeds=0,1,2 --few_shot=100,200,500 --splits=0,1,2 [--config.a.b=v ...]

One multiple-choice training run per (context or not, training set, seed), each in its own directory
under the workdir, run in this process one after the other. A run whose `result.json` exists is
finished and reused, and an unfinished one resumes from its checkpoints, so the command can be rerun
after an interruption (delete a run's directory to retrain it).

Training sets. "full" is the config's own: every training question, or the random subset its
`multiple_choice.train_size` asks for (MedMCQA: the paper's 10k). A few-shot size N is trained on each of
the random N-question splits `--splits` (`multiple_choice.subset_seed`), each with every seed, as the paper
repeats its few-shot runs over 3 random splits: the few-shot cells average splits x seeds runs, so their
spread holds both the luck of the draw of questions and of the training run. A seed sets the score head's
initialisation and the batch order (`seed`, `data.seed`), as the Trainer seed of the paper's runs does.

What a run reports is the paper's number: the model selected on dev accuracy (the evaluation early stopping
keeps as its best, the first one reaching the highest `eval_accuracy` in `metrics.jsonl`) measured on the
test split (its `test_accuracy` at that step) when the config names one (`multiple_choice.test_file`:
MedQA, HEAD-QA), else its dev accuracy (MedMCQA, whose test answers are not released).

The privacy budget is read from the KEYWORDS file `data_gen keywords` wrote: the words sent over all
question words (`words_kept / words_total`, summed over questions). The table is printed and written to
`study.md` and `study.json` in the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from alpacare_jax.data import multiple_choice
from alpacare_jax.train.early_stopping import EarlyStopping
from alpacare_jax.train.loop import train
from alpacare_jax.train.metrics import read_metrics
from alpacare_jax.train.objectives import MultipleChoice

RESULT = "result.json"
FULL = 0  # the training-set size that stands for the config's own training set


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One training run of the study."""
    context: bool
    train_size: int  # FULL, or the few-shot size
    split: int  # which random few-shot training split (the config's `subset_seed` for FULL)
    seed: int

    @property
    def name(self) -> str:
        """Its directory under the study's workdir."""
        setting = "full" if self.train_size == FULL else f"n{self.train_size}/split{self.split}"
        return f"{'context' if self.context else 'no_context'}/{setting}/seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Contexts:
    """The CONTEXTS files of each split, used by the runs with context."""
    train: str
    eval: str
    test: str = ""  # needed when the config has a test_file


@dataclasses.dataclass(frozen=True)
class RunResult:
    run: PlannedRun
    train_questions: int
    selected_step: int  # the dev-selected evaluation
    dev_accuracy: float  # at selected_step: the best dev accuracy
    test_accuracy: float | None  # at selected_step; None without a test split

    @property
    def accuracy(self) -> float:
        """What the table reports: the selected model's test accuracy, or its dev accuracy without a test split."""
        return self.dev_accuracy if self.test_accuracy is None else self.test_accuracy

    @staticmethod
    def from_json(record: dict) -> RunResult:
        return RunResult(**{**record, "run": PlannedRun(**record["run"])})


@dataclasses.dataclass(frozen=True)
class PrivacyBudget:
    questions: int
    words_total: int
    words_kept: int

    @property
    def share(self) -> float:
        return self.words_kept / self.words_total if self.words_total else 0.0


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a training-set size, accuracy without and with context over its runs."""
    train_size: int
    train_questions: int
    without_context: tuple[float, ...]  # one accuracy per run (split x seed)
    with_context: tuple[float, ...]

    @staticmethod
    def _mean_std(values: Sequence[float]) -> tuple[float, float]:
        """Mean and sample standard deviation (n - 1), 0 for a single run."""
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def summary(self) -> dict:
        (m0, s0), (m1, s1) = self._mean_std(self.without_context), self._mean_std(self.with_context)
        return {"setting": "full" if self.train_size == FULL else "few-shot", "train_questions": self.train_questions,
                "without_context": {"mean": m0, "std": s0, "runs": list(self.without_context)},
                "with_context": {"mean": m1, "std": s1, "runs": list(self.with_context)}, "gain": m1 - m0}


@dataclasses.dataclass(frozen=True)
class StudyResult:
    rows: list[Row]
    privacy: PrivacyBudget
    seeds: tuple[int, ...]
    splits: tuple[int, ...]
    reported_split: str  # "test" or "dev"

    def to_json(self) -> dict:
        return {"seeds": list(self.seeds), "few_shot_splits": list(self.splits), "reported_split": self.reported_split,
                "rows": [r.summary() for r in self.rows],
                "privacy_budget": {"questions": self.privacy.questions, "words_total": self.privacy.words_total,
                                   "words_kept": self.privacy.words_kept, "share": self.privacy.share}}

    def to_markdown(self) -> str:
        lines = ["| Setting | Training questions | Without context | With context | Gain |",
                 "|---|---:|---:|---:|---:|"]
        for row in self.rows:
            s = row.summary()
            cell = lambda x: f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f}"  # noqa: E731
            lines.append(f"| {s['setting']} | {s['train_questions']} | {cell(s['without_context'])} | "
                         f"{cell(s['with_context'])} | {100 * s['gain']:+.2f} |")
        seeds, splits = ", ".join(map(str, self.seeds)), ", ".join(map(str, self.splits))
        measured = ("Test accuracy (%) of the model selected on dev accuracy" if self.reported_split == "test"
                    else "Dev accuracy (%) of the model selected on it")
        runs = f"Full: mean ± std over seeds {seeds} ({_count(len(self.seeds), 'run')} per cell)."
        if any(row.train_size != FULL for row in self.rows):
            per_cell = _count(len(self.splits) * len(self.seeds), "run")
            runs += (f" Few-shot: over {_count(len(self.splits), 'random training split')} ({splits}) x "
                     f"{_count(len(self.seeds), 'seed')} ({per_cell} per cell).")
        p = self.privacy
        lines += ["", f"{measured}. {runs} Privacy budget: {100 * p.share:.2f}% of the question words sent "
                      f"({p.words_kept} of {p.words_total} words, {p.questions} questions)."]
        return "\n".join(lines) + "\n"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def privacy_budget(keywords_file: str | Path) -> PrivacyBudget:
    """Overall budget of a KEYWORDS JSONL file: words kept over words total, summed over its questions."""
    questions = total = kept = 0
    with open(keywords_file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                total += int(record["words_total"])
                kept += int(record["words_kept"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{keywords_file}: line {number}: needs integer fields 'words_total' and "
                                 f"'words_kept' ({err})") from None
            questions += 1
    return PrivacyBudget(questions, total, kept)


def plan(config: ml_collections.ConfigDict, *, seeds: Sequence[int], few_shot: Sequence[int],
         splits: Sequence[int]) -> list[PlannedRun]:
    """Every run: without and with context; the full training set with each seed, and each few-shot size
    on each split with each seed."""
    sets = [(FULL, config.multiple_choice.subset_seed)] + [(size, split) for size in few_shot for split in splits]
    return [PlannedRun(context, size, split, seed) for size, split in sets for context in (False, True)
            for seed in seeds]


def run_config(config: ml_collections.ConfigDict, run: PlannedRun, contexts: Contexts) -> ml_collections.ConfigDict:
    """The study's config for one run: `config` with its seed, training set and contexts set.

    FULL keeps the config's training set (its `train_size` and `subset_seed`); a few-shot size draws split
    `run.split` of that many questions.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = run.seed
    c.data.seed = run.seed
    mc = c.multiple_choice
    if run.train_size != FULL:
        mc.train_size = run.train_size
        mc.subset_seed = run.split
    mc.train_contexts_file = contexts.train if run.context else ""
    mc.eval_contexts_file = contexts.eval if run.context else ""
    mc.test_contexts_file = contexts.test if run.context and mc.test_file else ""
    return c


def selected_evaluation(records: Sequence[Mapping], *, with_test: bool, source: str) -> tuple[int, float, float | None]:
    """(step, dev accuracy, test accuracy) of the evaluation early stopping selects among `records`."""
    metric, higher_is_better = MultipleChoice.selection_metric
    best = EarlyStopping(metric, higher_is_better, patience=0).replay(records)
    if math.isnan(best.best):
        raise ValueError(f"{source}: the run logged no {metric} (set config.eval_every)")
    record = next(r for r in records if int(r["step"]) == best.best_step and metric in r)
    if not with_test:
        return best.best_step, best.best, None
    if "test_accuracy" not in record:
        raise ValueError(f"{source}: the evaluation at step {best.best_step} has no test_accuracy, although "
                         f"multiple_choice.test_file is set: the trainer did not evaluate the test split")
    return best.best_step, best.best, float(record["test_accuracy"])


def run_one(config: ml_collections.ConfigDict, workdir: Path, run: PlannedRun) -> RunResult:
    """Trains (or resumes, or reuses) one run (`config` is its `run_config`); returns its dev-selected result."""
    done = workdir / RESULT
    if done.exists():
        return RunResult.from_json(json.loads(done.read_text()))
    train(config, workdir)
    step, dev, test = selected_evaluation(read_metrics(workdir), with_test=bool(config.multiple_choice.test_file),
                                          source=str(workdir / "metrics.jsonl"))
    result = RunResult(run, len(multiple_choice.load_split(config.multiple_choice, "train")), step, dev, test)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(result)) + "\n")
    tmp.replace(done)  # written whole or not at all: a half-written result is never reused
    return result


def run_study(config: ml_collections.ConfigDict, workdir: str | Path, *, keywords_file: str | Path,
              contexts: Contexts, seeds: Sequence[int] = (0, 1, 2), few_shot: Sequence[int] = (100, 200, 500),
              splits: Sequence[int] = (0, 1, 2), progress: bool = True) -> StudyResult:
    """Every run of the study, then the table (also written to `study.md` and `study.json`)."""
    if config.get("objective") != "multiple_choice":
        raise ValueError(f"the study needs a multiple-choice config, got objective={config.get('objective')!r}")
    if not seeds:
        raise ValueError("no seeds")
    if few_shot and not splits:
        raise ValueError("few-shot sizes given but no splits")
    if config.multiple_choice.test_file and not contexts.test:
        raise ValueError(f"multiple_choice.test_file={config.multiple_choice.test_file!r} is set: "
                         "the runs with context need the test split's CONTEXTS file too (--contexts_test)")
    workdir = Path(workdir)
    privacy = privacy_budget(keywords_file)  # read first: a bad file fails before hours of training
    results: dict[tuple[int, bool], list[RunResult]] = {}
    for run in tqdm(plan(config, seeds=seeds, few_shot=few_shot, splits=splits), desc="context study", unit="run",
                    disable=not progress):
        result = run_one(run_config(config, run, contexts), workdir / run.name, run)
        results.setdefault((run.train_size, run.context), []).append(result)
    sizes = [FULL, *few_shot]
    rows = [Row(size, results[size, False][0].train_questions, tuple(r.accuracy for r in results[size, False]),
                tuple(r.accuracy for r in results[size, True])) for size in sizes]
    study = StudyResult(rows, privacy, tuple(seeds), tuple(splits) if few_shot else (),
                        "test" if config.multiple_choice.test_file else "dev")
    (workdir / "study.md").write_text(study.to_markdown())
    (workdir / "study.json").write_text(json.dumps(study.to_json(), indent=2) + "\n")
    return study


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    # Flags are defined here, not at import, so that importing the study's functions defines no absl flags.
    config_flag = config_flags.DEFINE_config_file("config", None, "multiple-choice config (configs/mcq_*.py)")
    workdir = flags.DEFINE_string("workdir", None, "study directory: one run directory per run")
    keywords = flags.DEFINE_string("keywords", None, "KEYWORDS JSONL of `data_gen keywords` (privacy budget)")
    contexts_train = flags.DEFINE_string("contexts_train", None, "CONTEXTS JSONL of the training split")
    contexts_eval = flags.DEFINE_string("contexts_eval", None, "CONTEXTS JSONL of the dev split")
    contexts_test = flags.DEFINE_string("contexts_test", "", "CONTEXTS JSONL of the test split (with a test_file)")
    seeds = flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds, for every training set")
    few_shot = flags.DEFINE_string("few_shot", "100,200,500", "comma-separated few-shot training sizes ('' = none)")
    splits = flags.DEFINE_string("splits", "0,1,2", "comma-separated random training splits of each few-shot size")
    flags.mark_flags_as_required(["config", "workdir", "keywords", "contexts_train", "contexts_eval"])

    def run(args: Sequence[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        logging.getLogger().setLevel(logging.INFO)
        for noisy in ("absl", "jax", "orbax", "grain", "tensorflow_datasets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        study = run_study(config_flag.value, workdir.value, keywords_file=keywords.value,
                          contexts=Contexts(contexts_train.value, contexts_eval.value, contexts_test.value),
                          seeds=_ints(seeds.value), few_shot=_ints(few_shot.value), splits=_ints(splits.value))
        print(study.to_markdown(), end="")

    app.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    main()
