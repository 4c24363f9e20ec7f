"""The contextual-prompting study: without vs with context, full and few-shot, mean and std over seeds.

    python -m alpacare_jax.eval.context_study --config=configs/mcq_medqa.py --workdir=runs/medqa_study \
        --keywords=data/medqa/train_keywords.jsonl \
        --contexts_train=data/medqa/train_contexts.jsonl --contexts_eval=data/medqa/dev_contexts.jsonl \
        --seeds=0,1,2 --few_shot=100,200,500 [--config.a.b=v ...]

One multiple-choice training run per (context or not, training-set size, seed), each in its own
directory under the workdir, run in this process one after the other. A run whose `result.json`
exists is finished and reused, and an unfinished one resumes from its checkpoints, so the command
can be rerun after an interruption (delete a run's directory to retrain it). Seed `s` also picks the
few-shot training subset `s` (`multiple_choice.subset_seed`): the paper's three splits.

A run's accuracy is its best dev accuracy (`eval_accuracy` in `metrics.jsonl`): the evaluation
early stopping selects. The privacy budget is read from the KEYWORDS file `data_gen keywords`
wrote: the words sent over all question words (`words_kept / words_total`, summed over questions).
The table is printed and written to `study.md` and `study.json` in the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from tqdm import tqdm

RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class RunResult:
    context: bool
    train_size: int  # 0 = every training question
    seed: int
    train_questions: int
    accuracy: float  # best dev accuracy


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
    """One line of the table: a training-set size, accuracy without and with context over the seeds."""
    train_size: int
    train_questions: int
    without_context: tuple[float, ...]  # one accuracy per seed
    with_context: tuple[float, ...]

    @staticmethod
    def _mean_std(values: Sequence[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def summary(self) -> dict:
        (m0, s0), (m1, s1) = self._mean_std(self.without_context), self._mean_std(self.with_context)
        return {"setting": "full" if self.train_size == 0 else "few-shot", "train_questions": self.train_questions,
                "without_context": {"mean": m0, "std": s0, "runs": list(self.without_context)},
                "with_context": {"mean": m1, "std": s1, "runs": list(self.with_context)}, "gain": m1 - m0}


@dataclasses.dataclass(frozen=True)
class StudyResult:
    rows: list[Row]
    privacy: PrivacyBudget
    seeds: tuple[int, ...]

    def to_json(self) -> dict:
        return {"seeds": list(self.seeds), "rows": [r.summary() for r in self.rows],
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
        p = self.privacy
        lines += ["", f"Dev accuracy (%), mean ± std over seeds {', '.join(map(str, self.seeds))}. "
                      f"Privacy budget: {100 * p.share:.2f}% of the question words sent "
                      f"({p.words_kept} of {p.words_total} words, {p.questions} questions)."]
        return "\n".join(lines) + "\n"


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


def run_config(config: ml_collections.ConfigDict, *, context: bool, train_size: int, seed: int,
               contexts_train: str, contexts_eval: str) -> ml_collections.ConfigDict:
    """The study's config for one run: `config` with its seed, training subset and contexts set."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = seed
    c.multiple_choice.train_size = train_size
    c.multiple_choice.subset_seed = seed
    c.multiple_choice.train_contexts_file = contexts_train if context else ""
    c.multiple_choice.eval_contexts_file = contexts_eval if context else ""
    return c


def run_one(config: ml_collections.ConfigDict, workdir: Path, *, context: bool, train_size: int,
            seed: int) -> RunResult:
    """Trains (or resumes, or reuses) one run and returns its best dev accuracy."""
    from alpacare_jax.data import multiple_choice
    from alpacare_jax.train.loop import train
    from alpacare_jax.train.metrics import read_metrics

    done = workdir / RESULT
    if done.exists():
        return RunResult(**json.loads(done.read_text()))
    train(config, workdir)
    accuracies = [r["eval_accuracy"] for r in read_metrics(workdir) if "eval_accuracy" in r]
    if not accuracies:
        raise ValueError(f"{workdir}: the run logged no eval_accuracy (set config.eval_every)")
    result = RunResult(context, train_size, seed, len(multiple_choice.load_split(config.multiple_choice, "train")),
                       max(accuracies))
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(result)) + "\n")
    tmp.replace(done)  # written whole or not at all: a half-written result is never reused
    return result


def run_study(config: ml_collections.ConfigDict, workdir: str | Path, *, keywords_file: str | Path,
              contexts_train: str, contexts_eval: str, seeds: Sequence[int] = (0, 1, 2),
              few_shot: Sequence[int] = (100, 200, 500), progress: bool = True) -> StudyResult:
    """Every run of the study, then the table (also written to `study.md` and `study.json`)."""
    if config.get("objective") != "multiple_choice":
        raise ValueError(f"the study needs a multiple-choice config, got objective={config.get('objective')!r}")
    if not seeds:
        raise ValueError("no seeds")
    workdir = Path(workdir)
    privacy = privacy_budget(keywords_file)  # read first: a bad file fails before hours of training
    sizes = [0, *few_shot]
    plan = [(size, context, seed) for size in sizes for context in (False, True) for seed in seeds]
    results: dict[tuple[int, bool, int], RunResult] = {}
    for size, context, seed in tqdm(plan, desc="context study", unit="run", disable=not progress):
        name = f"{'context' if context else 'no_context'}/{'full' if size == 0 else f'n{size}'}/seed{seed}"
        c = run_config(config, context=context, train_size=size, seed=seed, contexts_train=contexts_train,
                       contexts_eval=contexts_eval)
        results[size, context, seed] = run_one(c, workdir / name, context=context, train_size=size, seed=seed)
    rows = [Row(size, results[size, False, seeds[0]].train_questions,
                tuple(results[size, False, s].accuracy for s in seeds),
                tuple(results[size, True, s].accuracy for s in seeds)) for size in sizes]
    study = StudyResult(rows, privacy, tuple(seeds))
    (workdir / "study.md").write_text(study.to_markdown())
    (workdir / "study.json").write_text(json.dumps(study.to_json(), indent=2) + "\n")
    return study


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "multiple-choice config (configs/mcq_*.py)")
    _WORKDIR = flags.DEFINE_string("workdir", None, "study directory: one run directory per (context, size, seed)")
    _KEYWORDS = flags.DEFINE_string("keywords", None, "KEYWORDS JSONL of `data_gen keywords` (privacy budget)")
    _TRAIN = flags.DEFINE_string("contexts_train", None, "CONTEXTS JSONL of the training split")
    _EVAL = flags.DEFINE_string("contexts_eval", None, "CONTEXTS JSONL of the dev split")
    _SEEDS = flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds (seed s also picks few-shot subset s)")
    _FEW = flags.DEFINE_string("few_shot", "100,200,500", "comma-separated few-shot training sizes ('' = none)")
    flags.mark_flags_as_required(["config", "workdir", "keywords", "contexts_train", "contexts_eval"])

    def run(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        logging.getLogger().setLevel(logging.INFO)
        for noisy in ("absl", "jax", "orbax", "grain", "tensorflow_datasets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        study = run_study(_CONFIG.value, _WORKDIR.value, keywords_file=_KEYWORDS.value,
                          contexts_train=_TRAIN.value, contexts_eval=_EVAL.value, seeds=_ints(_SEEDS.value),
                          few_shot=_ints(_FEW.value))
        print(study.to_markdown(), end="")

    app.run(run, argv=argv)
    return 0


if __name__ == "__main__":
    main()
