"""The paper's benchmark suite in one command, resumable, with one table at the end:

    python -m alpacare_jax.eval benchmarks --model=HF_DIR_OR_WORKDIR --suite=medical|general|all \
        --out_dir=BENCH [--data_dir=LOCAL_JSONL]

Medical: MedQA (USMLE, 4 options), HeadQA (English), PubMedQA (labelled), MedMCQA (dev), the six MMLU
medical subjects, MeQSum (ROUGE-L). General: AlpacaFarm (free-form, judged like Table 1), MMLU (57
subjects), BBH, TruthfulQA MC1/MC2. Each harness task runs through `lm_eval.simple_evaluate` with the
`alpacare_jax` backend, one task at a time, and its results are stored at once:

    BENCH/<model>/tasks/<task>.yaml          the task config that ran (the harness's stock config included)
    BENCH/<model>/results/<task>.json        the harness's results for that task (metrics, n, shots, config)
    BENCH/<model>/alpaca_farm/outputs.json   AlpacaFarm answers (resumable generation)
    BENCH/<model>/alpaca_farm/judge/         verdicts (annotation cache) and the win-rate summary
    BENCH/benchmarks.json, benchmarks.md     the table: every model under BENCH, every benchmark of the suite

A rerun recomputes nothing already scored (the model is not even loaded when every task is stored).
On a TPU pod every host runs the same command; process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from data_gen import judge as judge_lib
from data_gen.runner import RunSettings
from data_gen.store import write_json_atomic

from alpacare_jax.eval import tasks as tasks_lib
from alpacare_jax.eval.tasks import ALPACA_FARM, Benchmark

log = logging.getLogger(__name__)

TABLE_JSON, TABLE_MARKDOWN = "benchmarks.json", "benchmarks.md"
ALPACA_FARM_FILE = "eval.jsonl"  # DATA_DIR/alpaca_farm/eval.jsonl: the evaluation set with its reference outputs
ALPACA_FARM_REFERENCE = "text_davinci_003"  # who wrote the `output` column of AlpacaFarm's evaluation set


@dataclasses.dataclass(frozen=True)
class SuiteLayout:
    """Where everything lives under --out_dir."""

    root: Path

    def model_dir(self, model: str) -> Path:
        return self.root / model

    def task_configs(self, model: str) -> Path:
        return self.model_dir(model) / "tasks"

    def result(self, model: str, task: str) -> Path:
        return self.model_dir(model) / "results" / f"{task}.json"

    def alpaca_farm_outputs(self, model: str) -> Path:
        return self.model_dir(model) / "alpaca_farm" / "outputs.json"

    def judge_dir(self, model: str) -> Path:
        return self.model_dir(model) / "alpaca_farm" / "judge"


@dataclasses.dataclass(frozen=True)
class SuiteOptions:
    suite: str = "all"
    data_dir: Path | None = None  # local JSONL files (tasks.py layout); None: the harness's hub datasets
    limit: int | None = None  # only the first N documents per task (smoke runs); stored with the results
    batch_size: int = 16
    alpaca_farm_reference: Path | None = None  # default: DATA_DIR/alpaca_farm/eval.jsonl
    judge_model: str = judge_lib.JudgeConfig().model
    judge: RunSettings = dataclasses.field(default_factory=RunSettings)
    max_new_tokens: int = 512  # AlpacaFarm answers
    progress: bool = True


def _is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def stored_result(layout: SuiteLayout, model: str, task: str, limit: int | None) -> dict | None:
    path = layout.result(model, task)
    if not path.exists():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    return stored if stored.get("limit") == limit else None  # scored on other documents: score again


def run_tasks(lm, tasks: Sequence[str], config_dir: Path, limit: int | None) -> dict[str, dict]:
    """Harness tasks (one benchmark's) through one `simple_evaluate` call: per task, what the table needs.

    One call per benchmark batches MMLU's 57 subjects together; each task's result is stored on its own.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=lm, tasks=[str(config_dir / f"{t}.yaml") for t in tasks], limit=limit,
                                      task_manager=TaskManager(include_path=str(config_dir), include_defaults=False))
    if results is None:  # not the writing process
        return {}
    return {task: {"task": task, "limit": limit, "metrics": results["results"][task],
                   "n": results["n-samples"][task]["effective"], "num_fewshot": results["n-shot"].get(task, 0),
                   "version": results["versions"].get(task), "lm_eval_version": results.get("lm_eval_version"),
                   "config": json.loads(json.dumps(results["configs"][task], default=str))}
            for task in tasks}


def judge_alpaca_farm(outputs: Path, reference: Path, model: str, judge_dir: Path, judge_model: str,
                      settings: RunSettings) -> dict:
    """AlpacaFarm win rate of `outputs` against the reference outputs, by `data_gen`'s judge (both orders)."""
    comparison = judge_lib.build_comparison(outputs, reference, model_name=model,
                                            reference_name=ALPACA_FARM_REFERENCE, test_set="AlpacaFarm")
    run, [summary] = judge_lib.run_judge([comparison], judge_lib.JudgeConfig(model=judge_model), settings,
                                         judge_dir / "annotations.jsonl", judge_dir)
    log.info("AlpacaFarm judge: %s", run.line())
    return summary


def alpaca_farm_reference(options: SuiteOptions) -> Path:
    if options.alpaca_farm_reference is not None:
        return options.alpaca_farm_reference
    if options.data_dir is None:
        raise ValueError("AlpacaFarm needs its evaluation set with reference outputs: pass --data_dir (holding "
                         f"{ALPACA_FARM}/{ALPACA_FARM_FILE}) or --alpaca_farm_reference")
    return options.data_dir / ALPACA_FARM / ALPACA_FARM_FILE


def run_suite(model_path: str, layout: SuiteLayout, options: SuiteOptions, *, model_args: dict | None = None,
              name: str | None = None) -> dict:
    """Scores every benchmark of the suite not yet stored, then writes and returns the table (see module doc)."""
    from alpacare_jax.infer.loading import model_name

    name = name or model_name(model_path)
    selected = tasks_lib.suite_benchmarks(options.suite)
    files: dict[str, dict[str, Path]] | None = None
    if options.data_dir is not None:  # check every local file before any compute
        files = {t: tasks_lib.check_data(b, t, options.data_dir) for b in selected for t in b.tasks}
    pending = [t for b in selected for t in b.tasks if stored_result(layout, name, t, options.limit) is None]
    farm = next((b for b in selected if b.title == "AlpacaFarm"), None)
    farm_tasks = []
    if farm is not None:
        from alpacare_jax.infer.generate import answered_all, load_task_file

        reference = alpaca_farm_reference(options)
        tasks_lib.read_jsonl(reference, farm.fields)
        farm_tasks = load_task_file(reference)[: options.limit]
        farm_pending = not answered_all(layout.alpaca_farm_outputs(name), farm_tasks)
    else:
        farm_pending = False

    if pending or farm_pending:
        from alpacare_jax.eval.lm_eval_backend import AlpacareJaxLM

        lm = AlpacareJaxLM(model_path, batch_size=options.batch_size, **(model_args or {}))
        tasks_lib.write_task_configs(pending, layout.task_configs(name), files)
        for benchmark in selected:
            todo = [t for t in benchmark.tasks if t in pending]
            if not todo:
                continue
            log.info("%s: %s (%d tasks)", name, benchmark.title, len(todo))
            for task, result in run_tasks(lm, todo, layout.task_configs(name), options.limit).items():
                write_json_atomic(layout.result(name, task), result)
        if farm_pending:
            _answer_alpaca_farm(lm, farm_tasks, layout.alpaca_farm_outputs(name), options)
        del lm

    if farm is not None and _is_writer():
        judge_alpaca_farm(layout.alpaca_farm_outputs(name), alpaca_farm_reference(options), name,
                          layout.judge_dir(name), options.judge_model, options.judge)
    if not _is_writer():
        return {}
    table = build_table(layout, selected)
    write_json_atomic(layout.root / TABLE_JSON, table)
    (layout.root / TABLE_MARKDOWN).write_text(format_markdown(table), encoding="utf-8")
    return table


def _answer_alpaca_farm(lm, farm_tasks, out: Path, options: SuiteOptions) -> None:
    """Answers to AlpacaFarm's instructions with the training prompt (greedy), as for Table 1."""
    from alpacare_jax.infer.generate import generate_outputs
    from alpacare_jax.model import SamplingConfig

    stats = generate_outputs(lm.loaded, farm_tasks, out, SamplingConfig(max_new_tokens=options.max_new_tokens),
                             batch_size=options.batch_size, progress=options.progress and _is_writer())
    log.info("AlpacaFarm: %s", stats.line())


# ---- the table ------------------------------------------------------------------------------------------

def _metric(metrics: dict, metric: str) -> float:
    """The harness reports `metric,filter`; the suite's tasks have one filter each."""
    [value] = [v for k, v in metrics.items() if k.split(",")[0] == metric]
    return float(value)


def benchmark_score(layout: SuiteLayout, model: str, benchmark: Benchmark) -> dict | None:
    """{score (percent), n, shots, complete} for one model and benchmark, or None if nothing is stored."""
    if benchmark.title == "AlpacaFarm":
        summaries = sorted(layout.judge_dir(model).glob("winrate__*.json"))
        if not summaries:
            return None
        summary = json.loads(summaries[0].read_text(encoding="utf-8"))
        return {"score": summary["win_rate"], "n": summary["n_examples"], "shots": 0,
                "complete": summary["complete"], "judge_model": summary["judge_model"],
                "reference": summary["reference_model"]}
    stored = [json.loads(p.read_text(encoding="utf-8")) for t in benchmark.tasks
              if (p := layout.result(model, t)).exists()]
    if not stored:
        return None
    weights = [r["n"] if benchmark.weight_by_size else 1 for r in stored]
    score = sum(w * _metric(r["metrics"], benchmark.metric) for w, r in zip(weights, stored)) / sum(weights)
    return {"score": 100 * score, "n": sum(r["n"] for r in stored), "shots": sorted({r["num_fewshot"] for r in stored}),
            "complete": len(stored) == len(benchmark.tasks), "tasks": len(stored)}


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
             "| Benchmark | Metric | Shots | Tasks |", "|---|---|---|---|"]
    shots_seen = {c["title"]: set() for c in columns}
    for row in table["rows"].values():
        for title, score in row.items():
            if score is not None:
                shots = score["shots"]
                shots_seen[title].update(shots if isinstance(shots, list) else [shots])
    for c in columns:
        metric = "win rate vs text-davinci-003 (judged)" if c["title"] == "AlpacaFarm" else c["metric"]
        tasks = ", ".join(c["tasks"]) if len(c["tasks"]) <= 6 else f"{len(c['tasks'])} subtasks ({c['tasks'][0]}, ...)"
        shots = ",".join(str(s) for s in sorted(shots_seen[c["title"]])) or "-"
        notes.append(f"| {c['title']} | {metric} | {shots} | {tasks} |")
    return "\n".join(lines + notes) + "\n"

