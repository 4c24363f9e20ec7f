"""The paper's benchmark tasks as lm-evaluation-harness task configs, from the hub or from local JSONL files.

Every benchmark runs the harness's stock task config (prompt, shots, metric) unless stated otherwise
(MeQSum: ROUGE-L only, see task_configs/meqsum_rouge_l.yaml). `write_task_configs` writes one small YAML per task
that includes the stock config; with a data directory it also points the task at local JSONL files in
the dataset's own columns, laid out as

    DATA_DIR/<task>/<split>.jsonl          e.g. DATA_DIR/pubmedqa/test.jsonl, DATA_DIR/mmlu_anatomy/dev.jsonl

so an offline cluster runs exactly the task the hub would give it. `export_data` writes that layout from
the hub (on a machine with internet); `check_data` rejects a malformed file naming file, record and field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from data_gen.errors import DataError

PACKAGE_TASKS = Path(__file__).parent / "task_configs"  # our own task configs (package data)
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def stock_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One column of the paper's tables: harness tasks whose scores it averages, and how to read them."""

    title: str
    suite: str  # "medical" or "general"
    tasks: tuple[str, ...]
    metric: str  # the harness metric reported, e.g. "acc"
    fields: tuple[str, ...]  # columns every record of the dataset has (checked in local files)
    weight_by_size: bool = False  # several tasks: average over questions (as the harness's MMLU group)


def _stock_names(folder: str, prefix: str) -> tuple[str, ...]:
    """Task names of the stock configs in `folder` (file stem `s` -> task `prefix + s`)."""
    return tuple(prefix + p.stem.removeprefix(prefix) for p in sorted((stock_tasks_dir() / folder).glob("*.yaml"))
                 if not p.name.startswith("_"))


MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")
MMLU_FIELDS = ("question", "choices", "answer")
ALPACA_FARM = "alpaca_farm"  # free-form, judged: not a harness task


def benchmarks() -> list[Benchmark]:
    """The suite in table order (needs lm_eval installed: MMLU and BBH subtasks are read from its configs)."""
    return [
        Benchmark("MedQA", "medical", ("medqa_4options",), "acc",
                  ("sent1", "ending0", "ending1", "ending2", "ending3", "label")),
        Benchmark("HeadQA", "medical", ("headqa_en",), "acc", ("qtext", "ra", "answers")),
        Benchmark("PubMedQA", "medical", ("pubmedqa",), "acc", ("QUESTION", "CONTEXTS", "final_decision")),
        Benchmark("MedMCQA", "medical", ("medmcqa",), "acc", ("question", "opa", "opb", "opc", "opd", "cop")),
        Benchmark("MMLU-medical", "medical", tuple(f"mmlu_{s}" for s in MMLU_MEDICAL), "acc", MMLU_FIELDS,
                  weight_by_size=True),
        Benchmark("MeQSum", "medical", ("meqsum_rouge_l",), "rougeL", ("CHQ", "Summary")),
        Benchmark("AlpacaFarm", "general", (), "win_rate", ("instruction", "input", "output")),
        Benchmark("MMLU", "general", _stock_names("mmlu/default", "mmlu_"), "acc", MMLU_FIELDS, weight_by_size=True),
        Benchmark("BBH", "general", _stock_names("bbh/fewshot", "bbh_fewshot_"), "exact_match", ("input", "target"),
                  weight_by_size=True),
        Benchmark("TruthfulQA-MC1", "general", ("truthfulqa_mc1",), "acc", ("question", "mc1_targets")),
        Benchmark("TruthfulQA-MC2", "general", ("truthfulqa_mc2",), "acc", ("question", "mc2_targets")),
    ]


def suite_benchmarks(suite: str) -> list[Benchmark]:
    if suite not in ("medical", "general", "all"):
        raise ValueError(f"--suite must be medical, general or all, got {suite!r}")
    return [b for b in benchmarks() if suite in ("all", b.suite)]


def stock_config_path(task: str) -> Path:
    """The YAML file defining `task`: ours for MeQSum, else the harness's own."""
    ours = PACKAGE_TASKS / f"{task}.yaml"
    if ours.exists():
        return ours
    stock = stock_tasks_dir()
    if task.startswith("mmlu_"):
        return stock / "mmlu" / "default" / f"{task}.yaml"
    if task.startswith("bbh_fewshot_"):
        return stock / "bbh" / "fewshot" / f"{task.removeprefix('bbh_fewshot_')}.yaml"
    known = {"medqa_4options": "medqa/medqa.yaml", "headqa_en": "headqa/headqa_en.yaml",
             "pubmedqa": "pubmedqa/pubmedqa.yaml", "medmcqa": "medmcqa/medmcqa.yaml",
             "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
             "wikitext": "wikitext/wikitext.yaml"}
    if task not in known:
        raise KeyError(f"no task config known for {task!r}")
    return stock / known[task]


def resolved_config(task: str) -> dict:
    """The task's full config (includes merged), functions left unresolved: for splits and dataset names."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(stock_config_path(task), resolve_func=False)


def local_split_files(task: str, data_dir: Path) -> dict[str, Path]:
    """{split: file} of the task's splits present under data_dir/<task>/."""
    config = resolved_config(task)
    splits = {config[k] for k in SPLIT_KEYS if config.get(k)}
    return {s: data_dir / task / f"{s}.jsonl" for s in sorted(splits) if (data_dir / task / f"{s}.jsonl").exists()}


def read_jsonl(path: Path, fields: Sequence[str]) -> list[dict]:
    """Records of a local JSONL file; DataError naming file, record and field for anything malformed."""
    records = []
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, index, None, f"not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(path, index, None, "not a JSON object")
            for field in fields:
                if record.get(field) is None:
                    raise DataError(path, index, field, "missing (the dataset's own columns are expected)")
            records.append(record)
    if not records:
        raise DataError(path, None, None, "no records")
    return records


def check_data(benchmark: Benchmark, task: str, data_dir: Path) -> dict[str, Path]:
    """The task's local files after checking every record; FileNotFoundError if its evaluation split is absent."""
    config = resolved_config(task)
    files = local_split_files(task, data_dir)
    evaluated = config.get("test_split") or config.get("validation_split")
    if evaluated not in files:
        raise FileNotFoundError(f"{data_dir / task / f'{evaluated}.jsonl'}: missing (the {benchmark.title} "
                                f"task {task} is evaluated on its {evaluated!r} split)")
    for path in files.values():
        read_jsonl(path, benchmark.fields)
    return files


def task_config(task: str, files: dict[str, Path] | None = None) -> dict:
    """The YAML of one task to run: the stock config included, the data source overridden for local files."""
    config: dict = {"include": str(stock_config_path(task)), "task": task}
    if files is not None:
        stock = resolved_config(task)
        for key in SPLIT_KEYS:  # splits without a local file are dropped (e.g. an unused training split)
            if stock.get(key) and stock[key] not in files:
                config[key] = None
        config.update(dataset_path="json", dataset_name=None,
                      dataset_kwargs={"data_files": {split: str(path) for split, path in files.items()}})
    return config


def write_task_configs(tasks: Iterable[str], out_dir: Path, files: dict[str, dict[str, Path]] | None = None,
                       overrides: dict[str, dict] | None = None) -> list[Path]:
    """One YAML per task in out_dir (loaded with `TaskManager(include_path=out_dir, include_defaults=False)`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        config = {**task_config(task, None if files is None else files[task]), **(overrides or {}).get(task, {})}
        path = out_dir / f"{task}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        paths.append(path)
    return paths


ALPACA_FARM_HUB = ("tatsu-lab/alpaca_farm", "alpaca_farm_evaluation", "eval")


def export_data(data_dir: Path, suite: str = "all") -> list[Path]:
    """Writes the suite's datasets from the hub in the layout above (run once on a machine with internet)."""
    import datasets

    written = []

    def write(dataset, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.to_json(str(path), lines=True, force_ascii=False)
        written.append(path)

    for benchmark in suite_benchmarks(suite):
        if not benchmark.tasks:  # AlpacaFarm: its evaluation set, reference outputs included
            path, name, split = ALPACA_FARM_HUB
            write(datasets.load_dataset(path, name, split=split), data_dir / ALPACA_FARM / f"{split}.jsonl")
        for task in benchmark.tasks:
            config = resolved_config(task)
            for split in sorted({config[k] for k in SPLIT_KEYS if config.get(k)}):
                dataset = datasets.load_dataset(config["dataset_path"], config.get("dataset_name"), split=split,
                                                **(config.get("dataset_kwargs") or {}))
                write(dataset, data_dir / task / f"{split}.jsonl")
    return written
