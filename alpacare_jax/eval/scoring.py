"""Harness tasks scored in this process, one `lm_eval.simple_evaluate` call per task.

One call per task, not one per benchmark: the suite stores each task's result as soon as it is scored, so
an interrupted MMLU keeps every subject already done. `score_tasks` is the same path for a model that is
already in memory, e.g. a training hook that scores a few small tasks every N steps beside `eval_loss`:

    scores = score_tasks(model, tokenizer, ["pubmedqa", "mmlu_anatomy"], limit=100, mesh=mesh)
    # {"pubmedqa/acc": 0.52, "mmlu_anatomy/acc": 0.31}
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import lm_eval
import lm_eval.evaluator
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from lm_eval.tasks import TaskManager

from alpacare_jax.data.tokenizer import Tokenizer
from alpacare_jax.eval import tasks as tasks_lib
from alpacare_jax.eval.lm_eval_backend import DEFAULT_BATCH_SIZE, AlpacareJaxLM
from alpacare_jax.infer.loading import LoadedModel
from alpacare_jax.model import Llama


@functools.cache
def _environment() -> dict:
    info: dict = {}
    _collect_environment(info)
    return info


# `simple_evaluate` adds a description of the environment to every result, collected anew each call (with
# torch installed, torch's collect_env: `pip list` and driver queries, 3 s a call here). One call per task
# makes that minutes per suite; the environment of a process does not change, so it is collected once.
_collect_environment = lm_eval.evaluator.add_env_info
lm_eval.evaluator.add_env_info = lambda storage: storage.update(_environment())


def task_manager(config_dir: Path) -> TaskManager:
    """The harness's index of the task configs written to `config_dir` (and of nothing else)."""
    return TaskManager(include_path=str(config_dir), include_defaults=False)


def run_task(lm: AlpacareJaxLM, task: str, manager: TaskManager, config_dir: Path, limit: int | None) -> dict | None:
    """One task's results as the suite stores them (metrics, documents scored, shots, version, config);
    None on the processes that do not write (the harness aggregates on one)."""
    results = lm_eval.simple_evaluate(model=lm, tasks=[str(config_dir / f"{task}.yaml")], limit=limit,
                                      task_manager=manager)
    if results is None:
        return None
    return {"task": task, "metrics": results["results"][task], "n": results["n-samples"][task]["effective"],
            "num_fewshot": results["n-shot"].get(task, 0), "version": results["versions"].get(task),
            "lm_eval_version": results.get("lm_eval_version"),
            "config": json.loads(json.dumps(results["configs"][task], default=str))}


def metric_value(metrics: dict, metric: str) -> float:
    """The harness reports `metric,filter`; the suite's tasks have one filter each."""
    [value] = [v for k, v in metrics.items() if k.split(",")[0] == metric]
    return float(value)


def headline_metric(task: str) -> str:
    """The metric a task is reported by: its benchmark's in the suite, else the first its config lists."""
    benchmark = tasks_lib.benchmark_of(task)
    return benchmark.metric if benchmark else tasks_lib.resolved_config(task)["metric_list"][0]["metric"]


def score_tasks(model: Llama, tokenizer: Tokenizer, tasks: Sequence[str], *, limit: int | None, mesh: Mesh,
                data_dir: Path | None = None, overrides: Mapping[str, dict] | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, float]:
    """`{"<task>/<metric>": value}` of a live causal LM (parameters as they are, on `mesh`) on each task's
    first `limit` documents, from the hub or from `data_dir` (the suite's local layout); `overrides` as
    `tasks.expand_overrides` gives them. Every process gets the same scores (a pod's hosts call it together).
    """
    lm = AlpacareJaxLM(LoadedModel(model, tokenizer, name="training", step=None), batch_size=batch_size, mesh=mesh)
    files = None if data_dir is None else {t: tasks_lib.check_data(t, data_dir, overrides) for t in tasks}
    keys = [f"{task}/{headline_metric(task)}" for task in tasks]
    values = np.zeros(len(tasks), np.float64)
    with tempfile.TemporaryDirectory() as scratch:
        config_dir = Path(scratch)
        tasks_lib.write_task_configs(tasks, config_dir, files, overrides)
        manager = task_manager(config_dir)
        for i, (task, key) in enumerate(zip(tasks, keys)):
            result = run_task(lm, task, manager, config_dir, limit)
            if result is not None:
                values[i] = metric_value(result["metrics"], key.split("/")[1])
    if jax.process_count() > 1:  # the harness returned the scores on process 0 only
        values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    return dict(zip(keys, values.tolist()))
