"""The paper's benchmark suite in one command, resumable, with one table at the end:

    python -m alpacare_jax.eval benchmarks --model=HF_DIR_OR_WORKDIR --suite=medical|general|all \
        --out_dir=BENCH [--data_dir=LOCAL_JSONL] [--num_fewshot=MMLU=5] [--task_overrides=FILE.yaml]

Medical: MedQA (USMLE, 4 options), HeadQA (English), PubMedQA (labelled), MedMCQA (dev), the six MMLU
medical subjects, MeQSum (ROUGE-L). General: AlpacaFarm (free-form, judged like Table 1), MMLU (57
subjects), BBH, TruthfulQA MC1/MC2. Each harness task runs through `lm_eval.simple_evaluate` with the
`alpacare_jax` backend, one task at a time, and its results are stored at once:

    BENCH/<model>/model.json                 what the row's scores come from (model files, step, dtype)
    BENCH/<model>/tasks/<task>.yaml          the task config that ran (the harness's stock config included)
    BENCH/<model>/results/<task>.json        the harness's results for that task (metrics, n, shots, config)
                                             and their provenance: data digests, overrides, limit, versions
    BENCH/<model>/alpaca_farm/outputs.json   AlpacaFarm answers (resumable generation), settings.json beside
    BENCH/<model>/alpaca_farm/judge/         verdicts (annotation cache) and the win-rate summary
    BENCH/benchmarks.json, benchmarks.md     the table: every model under BENCH, every benchmark of the suite

A rerun recomputes nothing already scored with the same provenance (the model is not even loaded when
every task is stored); a task whose data, config, overrides, limit or harness version changed is scored
again. A row is one model: `<model>` defaults to the directory's name, plus the step for a training
workdir and the dtype when one is asked for, and a different model under a stored name is refused.

On a TPU pod every host runs the same command. Process 0 alone reads and writes BENCH (a TPU VM's disk is
its own): it decides what is pending and tells the others, so every host runs the same computations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import jax
import lm_eval
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from alpacare_jax.eval import scoring
from alpacare_jax.eval import tasks as tasks_lib
from alpacare_jax.eval.lm_eval_backend import AlpacareJaxLM
from alpacare_jax.eval.tasks import ALPACA_FARM, Benchmark
from alpacare_jax.infer.generate import answered_all, generate_outputs, load_task_file, partial_path
from alpacare_jax.infer.loading import model_name
from alpacare_jax.model import SamplingConfig
from alpacare_jax.train.checkpoint import Checkpointer
from alpacare_jax.workdir import Workdir
from data_gen import (
    DataError,
    JudgeConfig,
    JudgeResult,
    RunSettings,
    build_comparisons,
    read_summaries,
    run_judge,
    write_json_atomic,
)

log = logging.getLogger(__name__)

TABLE_JSON, TABLE_MARKDOWN = "benchmarks.json", "benchmarks.md"
ALPACA_FARM_FILE = "eval.jsonl"  # DATA_DIR/alpaca_farm/eval.jsonl: the evaluation set with its reference outputs
ALPACA_FARM_REFERENCE = "text_davinci_003"  # who wrote the `output` column of AlpacaFarm's evaluation set
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class SuiteLayout:
    """Where everything lives under --out_dir."""

    root: Path

    def model_dir(self, model: str) -> Path:
        return self.root / model

    def model_record(self, model: str) -> Path:
        return self.model_dir(model) / "model.json"

    def task_configs(self, model: str) -> Path:
        return self.model_dir(model) / "tasks"

    def result(self, model: str, task: str) -> Path:
        return self.model_dir(model) / "results" / f"{task}.json"

    def alpaca_farm_outputs(self, model: str) -> Path:
        return self.model_dir(model) / "alpaca_farm" / "outputs.json"

    def alpaca_farm_settings(self, model: str) -> Path:
        return self.model_dir(model) / "alpaca_farm" / "settings.json"

    def judge_dir(self, model: str) -> Path:
        return self.model_dir(model) / "alpaca_farm" / "judge"


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    suite: str = "all"
    data_dir: Path | None = None  # local JSONL files (tasks.py layout); None: the harness's hub datasets
    limit: int | None = None  # only the first N documents per task (smoke runs); stored with the results
    batch_size: int = 16
    benchmarks: tuple[str, ...] = ()  # titles of the suite's benchmarks to score (default: all); the table has all
    # Task config settings named for "all", a benchmark title or a task (`tasks.expand_overrides`).
    overrides: dict[str, dict] = dataclasses.field(default_factory=dict)
    alpaca_farm_reference: Path | None = None  # default: DATA_DIR/alpaca_farm/eval.jsonl
    judge_model: str = JudgeConfig().model
    judge: RunSettings = dataclasses.field(default_factory=RunSettings)
    allow_missing: bool = False  # AlpacaFarm rows without an answer: reported, and an error unless allowed
    max_new_tokens: int = 512  # AlpacaFarm answers
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What a row's scores come from: the model's directory, checkpoint step and dtype."""

    path: str
    step: int | None  # a workdir's checkpoint (the latest resolved to its number); None for an HF directory
    dtype: str | None  # as asked for; None: as stored
    weights: str  # an HF directory's weight and config files (names, sizes, modification times), digested

    @classmethod
    def of(cls, model: str | Path, *, step: int | None = None, dtype: str | None = None) -> ModelIdentity:
        remote = "://" in str(model)  # gs://...: the step names a workdir's weights; an HF export is not stat'ed
        path = epath.Path(model) if remote else epath.Path(Path(model).resolve())
        if Workdir.holds_run(path):
            if step is None:  # "the latest" changes as training goes on: name the step it is now
                checkpointer = Checkpointer(Workdir(path).checkpoints_dir, save_every=0, keep=1 << 30,
                                            async_save=False)
                try:
                    steps = checkpointer.all_steps()
                finally:
                    checkpointer.close()
                if not steps:
                    raise FileNotFoundError(f"no checkpoints in {Workdir(path).checkpoints_dir}")
                step = steps[-1]
            return cls(str(path), step, dtype, "")
        files = [] if remote else [Path(p) for p in sorted(path.glob("*")) if p.suffix in (".safetensors", ".bin",
                                                                                           ".json")]
        return cls(str(path), step, dtype, _digest([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]))

    def default_name(self) -> str:
        """The row's name: the directory's, with the step of a workdir and the dtype when one was asked for."""
        parts = [model_name(self.path)]
        if self.step is not None:
            parts.append(f"step{self.step}")
        if self.dtype is not None:
            parts.append(self.dtype)
        return "-".join(parts)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def task_provenance(identity: ModelIdentity, task: str, files: dict[str, Path] | None, overrides: dict,
                    limit: int | None, max_gen_toks: int | None) -> dict:
    """Everything a task's stored result depends on; a result is reused only under the same provenance.

    Local data enter by content (moving DATA_DIR changes nothing), the stock config through the harness
    version and its resolved text.
    """
    provenance = {"model": dataclasses.asdict(identity), "overrides": overrides, "limit": limit,
                  "max_gen_toks": max_gen_toks, "lm_eval_version": lm_eval.__version__,
                  "stock_config": _digest(tasks_lib.resolved_config(task)),
                  "data": None if files is None else {split: _file_digest(p) for split, p in sorted(files.items())}}
    return json.loads(json.dumps(provenance, sort_keys=True))  # as it reads back from the stored JSON


def stored_result(layout: SuiteLayout, model: str, task: str, provenance: dict) -> dict | None:
    """The stored result of `task` if it was scored under `provenance`, else None (score it again)."""
    path = layout.result(model, task)
    if not path.exists():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored.get("provenance") == provenance:
        return stored
    changed = sorted(k for k in provenance if (stored.get("provenance") or {}).get(k) != provenance[k])
    log.info("%s: %s was scored with other settings (%s changed): scoring it again", model, task, ", ".join(changed))
    return None


def check_model_record(layout: SuiteLayout, model: str, identity: ModelIdentity) -> None:
    """Refuses to put a second model's scores in one row."""
    path = layout.model_record(model)
    if path.exists() and (stored := json.loads(path.read_text(encoding="utf-8"))) != dataclasses.asdict(identity):
        raise ValueError(f"{path}: the scores under {model!r} are of {stored['path']} (step {stored['step']}, "
                         f"dtype {stored['dtype']}, weights {stored['weights'] or '-'}), not of this run's "
                         f"{identity.path} (step {identity.step}, dtype {identity.dtype}, weights "
                         f"{identity.weights or '-'}): pass another --name or --out_dir")


class OtherProcessFailed(RuntimeError):
    """Another process of a multi-process run stopped (its own log says why); this one stops with it."""


def _is_writer() -> bool:
    return jax.process_index() == 0


def _everywhere(check: Callable[[], T]) -> T:
    """`check()` on every process; if it raises on any, every process raises (none is left waiting in a
    collective for the one that stopped)."""
    try:
        value, failure = check(), None
    except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other processes)
        value, failure = None, e
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(failure is not None))
        if failure is None and failed.any():
            raise OtherProcessFailed(f"processes {np.flatnonzero(failed).tolist()} stopped (see their logs)")
    if failure is not None:
        raise failure
    return value


def _writer_decides(decide: Callable[[], np.ndarray], like: np.ndarray) -> np.ndarray:
    """Process 0's `decide()` (it alone reads BENCH) on every process; `like` is its shape and dtype."""
    if jax.process_count() == 1:
        return decide()
    decision = _everywhere(lambda: decide() if _is_writer() else np.zeros_like(like))
    return np.asarray(multihost_utils.broadcast_one_to_all(decision.astype(np.int32))).astype(like.dtype)


def _writer_copies(paths: Sequence[Path], into: Path) -> list[Path]:
    """Process 0's files at `paths` on every process: the others get copies under `into` (missing stays missing)."""
    if jax.process_count() == 1:
        return list(paths)
    writer = _is_writer()
    sizes = np.asarray([p.stat().st_size if writer and p.exists() else -1 for p in paths], np.int64)
    sizes = np.asarray(multihost_utils.broadcast_one_to_all(sizes))
    copies = []
    for path, size in zip(paths, sizes):
        data = np.frombuffer(path.read_bytes(), np.uint8) if writer and size >= 0 else np.zeros(max(size, 0), np.uint8)
        if size > 0:
            data = np.asarray(multihost_utils.broadcast_one_to_all(data))
        copy = path if writer else into / path.name
        if not writer and size >= 0:
            copy.write_bytes(data.tobytes())
        copies.append(copy)
    return copies


def judge_alpaca_farm(outputs: Path, reference: Path, model: str, judge_dir: Path, judge_model: str,
                      settings: RunSettings, limit: int | None = None) -> JudgeResult:
    """AlpacaFarm win rate of `outputs` against the reference outputs, by `data_gen`'s judge (both orders).

    With `limit`, only the first `limit` reference rows are expected (those the suite answered).
    """
    comparisons = build_comparisons([outputs], [reference], model_name=model, reference_name=ALPACA_FARM_REFERENCE,
                                    test_sets=["AlpacaFarm"], reference_limit=limit)
    judged = run_judge(comparisons, JudgeConfig(model=judge_model), settings, judge_dir / "annotations.jsonl",
                       judge_dir)
    log.info("AlpacaFarm judge: %s", judged.run.line())
    return judged


def alpaca_farm_reference(options: SuiteOptions) -> Path:
    if options.alpaca_farm_reference is not None:
        return options.alpaca_farm_reference
    if options.data_dir is None:
        raise ValueError("AlpacaFarm needs its evaluation set with reference outputs: pass --data_dir (holding "
                         f"{ALPACA_FARM}/{ALPACA_FARM_FILE}) or --alpaca_farm_reference")
    return options.data_dir / ALPACA_FARM / ALPACA_FARM_FILE


def run_suite(model_path: str, layout: SuiteLayout, options: SuiteOptions, *, model_args: dict | None = None,
              name: str | None = None) -> dict:
    """Scores every benchmark of the suite not yet stored, then writes and returns the table (see module doc).

    Raises `JudgeIncomplete` once the table is written if AlpacaFarm's judging is not to be trusted as it is
    (unfinished, nothing scored, or rows without an answer unless `options.allow_missing`).
    """
    model_args = dict(model_args or {})
    suite = tasks_lib.suite_benchmarks(options.suite)  # the table's columns
    selected = tasks_lib.select_benchmarks(suite, options.benchmarks)  # what this run scores
    overrides = tasks_lib.expand_overrides(options.overrides, selected)
    identity = ModelIdentity.of(model_path, step=model_args.get("step"), dtype=model_args.get("dtype"))
    name = name or identity.default_name()
    suite_tasks = list(dict.fromkeys(t for b in selected for t in b.tasks))  # MMLU-medical's are MMLU's too
    farm = next((b for b in selected if b.title == "AlpacaFarm"), None)

    def check_inputs():  # every local file, on every host (each reads its own copy), before any compute
        files = None
        if options.data_dir is not None:
            files = {t: tasks_lib.check_data(t, options.data_dir, overrides) for t in suite_tasks}
        farm_tasks = []
        if farm is not None:
            reference = alpaca_farm_reference(options)
            tasks_lib.read_jsonl(reference, farm.fields)
            farm_tasks = load_task_file(reference)[: options.limit]
        return files, farm_tasks

    files, farm_tasks = _everywhere(check_inputs)
    provenance = {t: task_provenance(identity, t, None if files is None else files[t], overrides.get(t, {}),
                                     options.limit, model_args.get("max_gen_toks")) for t in suite_tasks}
    farm_settings = {"model": dataclasses.asdict(identity), "max_new_tokens": options.max_new_tokens}

    def pending_on_disk() -> np.ndarray:
        check_model_record(layout, name, identity)
        todo = [stored_result(layout, name, t, provenance[t]) is None for t in suite_tasks]
        farm_todo = farm is not None and (not answered_all(layout.alpaca_farm_outputs(name), farm_tasks)
                                          or _stored_settings(layout, name) not in (None, farm_settings))
        return np.asarray([*todo, farm_todo], bool)

    decided = _writer_decides(pending_on_disk, np.zeros(len(suite_tasks) + 1, bool))
    pending, farm_pending = [t for t, todo in zip(suite_tasks, decided) if todo], bool(decided[-1])

    if pending or farm_pending:
        lm = AlpacareJaxLM(model_path, batch_size=options.batch_size, **model_args)
        if _is_writer():  # the row is this model's from now on
            write_json_atomic(layout.model_record(name), dataclasses.asdict(identity))
        with tempfile.TemporaryDirectory() as scratch:
            # The configs are written where this process reads them: BENCH on process 0, a scratch folder
            # on the others.
            config_dir = layout.task_configs(name) if _is_writer() else Path(scratch)
            tasks_lib.write_task_configs(pending, config_dir, files, overrides)
            manager = scoring.task_manager(config_dir)
            scored: set[str] = set()
            for benchmark in selected:
                todo = [t for t in benchmark.tasks if t in pending and t not in scored]
                if todo:
                    log.info("%s: %s (%d tasks)", name, benchmark.title, len(todo))
                for task in todo:
                    scored.add(task)
                    result = scoring.run_task(lm, task, manager, config_dir, options.limit)
                    if result is not None:
                        write_json_atomic(layout.result(name, task), {**result, "overrides": overrides.get(task, {}),
                                                                      "provenance": provenance[task]})
            if farm_pending:
                _answer_alpaca_farm(lm, farm_tasks, layout, name, farm_settings, options, Path(scratch))
        del lm

    judged = None
    if farm is not None and _is_writer():
        judged = judge_alpaca_farm(layout.alpaca_farm_outputs(name), alpaca_farm_reference(options), name,
                                   layout.judge_dir(name), options.judge_model, options.judge, options.limit)
    if not _is_writer():
        return {}
    table = build_table(layout, suite)
    write_json_atomic(layout.root / TABLE_JSON, table)
    (layout.root / TABLE_MARKDOWN).write_text(format_markdown(table), encoding="utf-8")
    if judged is not None:  # after the table is written: it marks an incomplete AlpacaFarm cell with `*`
        judged.check(allow_missing=options.allow_missing)
    return table


def _stored_settings(layout: SuiteLayout, model: str) -> dict | None:
    path = layout.alpaca_farm_settings(model)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _answer_alpaca_farm(lm: AlpacareJaxLM, farm_tasks, layout: SuiteLayout, model: str, settings: dict,
                        options: SuiteOptions, scratch: Path) -> None:
    """Answers to AlpacaFarm's instructions with the training prompt (greedy), as for Table 1.

    Answers of other settings (another `max_new_tokens`) are set aside, not mixed in. Every process
    resumes from process 0's stored answers, so all of them decode the same batches; only process 0
    writes to BENCH.
    """
    out = layout.alpaca_farm_outputs(model)
    if _is_writer() and _stored_settings(layout, model) not in (None, settings):
        for stale in (out, partial_path(out)):
            if stale.exists():
                stale.rename(stale.with_name(f"{stale.name}.stale-{int(time.time())}"))
    if _is_writer():
        write_json_atomic(layout.alpaca_farm_settings(model), settings)
    out, _ = _writer_copies([out, partial_path(out)], scratch)  # generate_outputs finds the partial beside out
    stats = generate_outputs(lm.loaded, farm_tasks, out, SamplingConfig(max_new_tokens=options.max_new_tokens),
                             batch_size=options.batch_size, progress=options.progress and _is_writer())
    log.info("AlpacaFarm: %s", stats.line())


# ---- the table ------------------------------------------------------------------------------------------

def benchmark_score(layout: SuiteLayout, model: str, benchmark: Benchmark) -> dict | None:
    """{score (percent), n, shots, complete} for one model and benchmark, or None if nothing is stored."""
    if benchmark.title == "AlpacaFarm":
        summaries = read_summaries(layout.judge_dir(model))
        if not summaries:
            return None
        if len(summaries) > 1:  # e.g. judged again by another judge model: never pick one silently
            raise DataError(layout.judge_dir(model), None, None, f"{len(summaries)} AlpacaFarm win-rate summaries "
                            f"(judges {sorted({s['judge_model'] for s in summaries})}): keep one")
        [summary] = summaries
        return {"score": summary["win_rate"], "n": summary["n_examples"], "shots": 0,
                "complete": summary["complete"], "judge_model": summary["judge_model"],
                "reference": summary["reference_model"]}
    stored = [json.loads(p.read_text(encoding="utf-8")) for t in benchmark.tasks
              if (p := layout.result(model, t)).exists()]
    if not stored:
        return None
    weights = [r["n"] if benchmark.weight_by_size else 1 for r in stored]
    metrics = [scoring.metric_value(r["metrics"], benchmark.metric) for r in stored]
    overridden = sorted({f"{k}={json.dumps(v)}" for r in stored for k, v in r.get("overrides", {}).items()})
    score = 100 * sum(w * m for w, m in zip(weights, metrics)) / sum(weights)
    return {"score": score, "n": sum(r["n"] for r in stored), "shots": sorted({r["num_fewshot"] for r in stored}),
            "overrides": overridden, "complete": len(stored) == len(benchmark.tasks), "tasks": len(stored)}


def build_table(layout: SuiteLayout, selected: Sequence[Benchmark]) -> dict:
    models = sorted(p.name for p in layout.root.iterdir() if p.is_dir() and (
        (p / "results").is_dir() or (p / "alpaca_farm").is_dir()))
    rows = {}
    for model in models:
        rows[model] = {b.title: benchmark_score(layout, model, b) for b in selected}
    columns = [{"title": b.title, "suite": b.suite, "metric": b.metric, "tasks": list(b.tasks) or [ALPACA_FARM],
                "weight_by_size": b.weight_by_size} for b in selected]
    return {"columns": columns, "rows": rows}


def _suite_average(row: dict, columns: list[dict], suite: str) -> float | None:
    scores = [row[c["title"]]["score"] for c in columns if c["suite"] == suite and row.get(c["title"])]
    expected = [c for c in columns if c["suite"] == suite]
    return sum(scores) / len(scores) if scores and len(scores) == len(expected) else None


def format_markdown(table: dict) -> str:
    """Models down, benchmarks across (grouped medical / general, each with its average), as the paper's tables."""
    columns = table["columns"]
    suites = list(dict.fromkeys(c["suite"] for c in columns))
    header = ["Model"]
    for suite in suites:
        header += [c["title"] for c in columns if c["suite"] == suite] + [f"{suite.capitalize()} avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, row in table["rows"].items():
        cells = [model]
        for suite in suites:
            for c in columns:
                if c["suite"] != suite:
                    continue
                score = row.get(c["title"])
                cells.append("-" if score is None else f"{score['score']:.1f}{'' if score['complete'] else '*'}")
            average = _suite_average(row, columns, suite)
            cells.append("-" if average is None else f"{average:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Scores in percent. `*`: not every task or verdict is in yet (rerun to finish); `-`: not run.", "",
             "| Benchmark | Metric | Shots | Overridden (else the harness's stock config) | Tasks |",
             "|---|---|---|---|---|"]
    shots_seen = {c["title"]: set() for c in columns}
    overrides_seen = {c["title"]: set() for c in columns}
    for row in table["rows"].values():
        for title, score in row.items():
            if score is not None:
                shots = score["shots"]
                shots_seen[title].update(shots if isinstance(shots, list) else [shots])
                overrides_seen[title].update(score.get("overrides", []))
    for c in columns:
        metric = "win rate vs text-davinci-003 (judged)" if c["title"] == "AlpacaFarm" else c["metric"]
        tasks = ", ".join(c["tasks"]) if len(c["tasks"]) <= 6 else f"{len(c['tasks'])} subtasks ({c['tasks'][0]}, ...)"
        shots = ",".join(str(s) for s in sorted(shots_seen[c["title"]])) or "-"
        overridden = ", ".join(sorted(overrides_seen[c["title"]])) or "-"
        notes.append(f"| {c['title']} | {metric} | {shots} | {overridden} | {tasks} |")
    return "\n".join(lines + notes) + "\n"

