"""The paper's benchmark tasks as lm-evaluation-harness task configs, from the hub or from local JSONL files.

Every benchmark runs the harness's stock task config (prompt, shots, metric) unless stated otherwise
(MeQSum: ROUGE-L only, see task_configs/meqsum_rouge_l.yaml) or overridden by the user (`expand_overrides`:
settings such as `num_fewshot` named for a benchmark, a task or all of them). `write_task_configs` writes
one small YAML per task that includes the stock config; with a data directory it also points the task at
local JSONL files in the dataset's own columns, laid out as

    DATA_DIR/<task>/<split>.jsonl          e.g. DATA_DIR/pubmedqa/test.jsonl, DATA_DIR/mmlu_anatomy/dev.jsonl

so an offline cluster runs exactly the task the hub would give it. Only the splits a run reads are needed:
the evaluated one and, with shots, the one they are drawn from (`needed_splits`). `export_data` writes
those from the hub (on a machine with internet); `check_data` rejects a missing or malformed file naming
file, record and field."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from data_gen import DataError

PACKAGE_TASKS = Path(__file__).parent / "task_configs"  # our own task configs (package data)
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
ALL_TASKS = "all"  # the name under which an override applies to every task


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


def select_benchmarks(suite: Sequence[Benchmark], titles: Sequence[str]) -> list[Benchmark]:
    """The benchmarks of `suite` named in `titles` (all of them when none is named)."""
    unknown = sorted(set(titles) - {b.title for b in suite})
    if unknown:
        raise ValueError(f"--benchmarks {unknown}: not in the suite ({', '.join(b.title for b in suite)})")
    return [b for b in suite if not titles or b.title in titles]


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


def effective_config(task: str, overrides: Mapping[str, dict] | None = None) -> dict:
    """The stock config of `task` with the suite's overrides for it applied (what the harness will run)."""
    return {**resolved_config(task), **(overrides or {}).get(task, {})}


def evaluated_split(config: dict) -> str:
    return config.get("test_split") or config["validation_split"]


def shots_split(config: dict) -> str | None:
    """The split the harness draws few-shot examples from; None without shots or with shots written in the
    config (BBH). Without a `fewshot_split` the harness falls back to training, then validation, then test."""
    if not config.get("num_fewshot"):
        return None
    fewshot = config.get("fewshot_config") or {}
    if split := fewshot.get("split") or config.get("fewshot_split"):
        return split
    if fewshot.get("samples") is not None:
        return None
    return config.get("training_split") or config.get("validation_split") or config.get("test_split")


def needed_splits(task: str, overrides: Mapping[str, dict] | None = None) -> list[str]:
    """The splits a run of `task` reads: the evaluated one and, with shots, the one they come from."""
    config = effective_config(task, overrides)
    return [s for s in dict.fromkeys((evaluated_split(config), shots_split(config))) if s]


def local_split_files(task: str, data_dir: Path, overrides: Mapping[str, dict] | None = None) -> dict[str, Path]:
    """{split: file} of the splits the task reads that are present under data_dir/<task>/."""
    return {s: path for s in needed_splits(task, overrides) if (path := data_dir / task / f"{s}.jsonl").exists()}


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


def benchmark_of(task: str) -> Benchmark | None:
    """The suite's benchmark a harness task belongs to (None for any other task)."""
    return next((b for b in benchmarks() if task in b.tasks), None)


def check_data(task: str, data_dir: Path, overrides: Mapping[str, dict] | None = None) -> dict[str, Path]:
    """The task's local files after checking every record (in the dataset's columns, for the suite's tasks);
    FileNotFoundError if a split it reads is absent."""
    benchmark = benchmark_of(task)
    files = local_split_files(task, data_dir, overrides)
    config = effective_config(task, overrides)
    for split in needed_splits(task, overrides):
        if split not in files:
            role = "is evaluated on" if split == evaluated_split(config) else "takes its shots from"
            owner = f"the {benchmark.title} task {task}" if benchmark else f"task {task}"
            raise FileNotFoundError(f"{data_dir / task / f'{split}.jsonl'}: missing ({owner} {role} its {split!r} "
                                    "split)")
    for path in files.values():
        read_jsonl(path, benchmark.fields if benchmark else ())
    return files


def task_config(task: str, files: dict[str, Path] | None = None, overrides: Mapping[str, dict] | None = None) -> dict:
    """The YAML of one task to run: the stock config included, the data source pointed at local files when
    given, then the suite's overrides for the task."""
    config: dict = {"include": str(stock_config_path(task)), "task": task}
    if files is not None:
        stock = resolved_config(task)
        for key in SPLIT_KEYS:  # splits without a local file are not read (e.g. an unused training split)
            if stock.get(key) and stock[key] not in files:
                config[key] = None
        config.update(dataset_path="json", dataset_name=None,
                      dataset_kwargs={"data_files": {split: str(path) for split, path in files.items()}})
    return {**config, **(overrides or {}).get(task, {})}


def write_task_configs(tasks: Iterable[str], out_dir: Path, files: dict[str, dict[str, Path]] | None = None,
                       overrides: Mapping[str, dict] | None = None) -> list[Path]:
    """One YAML per task in out_dir (loaded with `TaskManager(include_path=out_dir, include_defaults=False)`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        path = out_dir / f"{task}.yaml"
        config = task_config(task, None if files is None else files[task], overrides)
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        paths.append(path)
    return paths


# ---- overrides of the stock configs ---------------------------------------------------------------------

def parse_num_fewshot(text: str) -> dict[str, dict]:
    """`--num_fewshot`: "5" (every task) or "MMLU=5,pubmedqa=3" (benchmark titles or task names)."""
    if text.strip().isdigit():
        return {ALL_TASKS: {"num_fewshot": int(text)}}
    named = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--num_fewshot: {item!r} is not NAME=N (N a whole number)")
        named[name.strip()] = {"num_fewshot": int(value)}
    return named


def read_overrides(path: Path) -> dict[str, dict]:
    """`--task_overrides` YAML: {benchmark title, task name or "all": {task config key: value}}."""
    try:
        named = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(path, None, None, f"not valid YAML ({e})") from None
    if not isinstance(named, dict):
        raise DataError(path, None, None, "not a mapping of benchmark or task names to config settings")
    for name, settings in named.items():
        if not isinstance(settings, dict):
            raise DataError(path, None, str(name), "not a mapping of task config keys to values")
    return {str(name): settings for name, settings in named.items()}


def merge_overrides(*named: Mapping[str, dict]) -> dict[str, dict]:
    """Several sources of named overrides as one, later ones winning key by key."""
    merged: dict[str, dict] = {}
    for source in named:
        for name, settings in source.items():
            merged[name] = {**merged.get(name, {}), **settings}
    return merged


def expand_overrides(named: Mapping[str, dict], selected: Sequence[Benchmark]) -> dict[str, dict]:
    """{task: settings} from settings named for every task ("all"), a benchmark (its title) or a task; the
    narrower name wins. A name that is none of these is an error (a typo would silently change nothing), as
    are two benchmarks sharing a task (MMLU-medical's subjects are MMLU's too) that set it differently."""
    titles = {b.title: b.tasks for b in selected}
    tasks = list(dict.fromkeys(t for b in selected for t in b.tasks))
    unknown = sorted(set(named) - {ALL_TASKS, *titles, *tasks})
    if unknown:
        raise ValueError(f"overrides for {unknown}: not a benchmark ({', '.join(titles)}) or task of the suite")
    expanded: dict[str, dict] = {}
    for task in tasks:
        settings = dict(named.get(ALL_TASKS, {}))
        by_benchmark: dict = {}
        for title in (t for t, members in titles.items() if task in members and t in named):
            for key, value in named[title].items():
                if key in by_benchmark and by_benchmark[key] != value and key not in named.get(task, {}):
                    raise ValueError(f"{task} is in several benchmarks that set {key} differently "
                                     f"({by_benchmark[key]!r} and {value!r}): name the task to settle it")
                by_benchmark[key] = value
        settings.update(by_benchmark)
        settings.update(named.get(task, {}))
        if settings:
            expanded[task] = settings
    return expanded


ALPACA_FARM_HUB = ("tatsu-lab/alpaca_farm", "alpaca_farm_evaluation", "eval")


def export_data(data_dir: Path, suite: str = "all", overrides: Mapping[str, dict] | None = None,
                load_dataset: Callable[..., Any] | None = None) -> list[Path]:
    """Writes, in the layout above, the splits the suite reads (run once on a machine with internet).

    Only the evaluated split of each task and the split its shots come from (none at the stock 0 shots):
    not, say, MedMCQA's 182k training questions. `load_dataset` is `datasets.load_dataset` unless given.
    """
    if load_dataset is None:
        import datasets

        load_dataset = datasets.load_dataset
    written = []

    def write(dataset, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.to_json(str(path), lines=True, force_ascii=False)
        written.append(path)

    selected = suite_benchmarks(suite)
    if any(not b.tasks for b in selected):  # AlpacaFarm: its evaluation set, reference outputs included
        path, name, split = ALPACA_FARM_HUB
        write(load_dataset(path, name, split=split), data_dir / ALPACA_FARM / f"{split}.jsonl")
    for task in dict.fromkeys(t for b in selected for t in b.tasks):  # MMLU-medical's subjects are MMLU's too
        config = effective_config(task, overrides)
        for split in needed_splits(task, overrides):
            dataset = load_dataset(config["dataset_path"], config.get("dataset_name"), split=split,
                                   **(config.get("dataset_kwargs") or {}))
            write(dataset, data_dir / task / f"{split}.jsonl")
    return written
