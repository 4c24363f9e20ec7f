"""Answer an evaluation set with a trained model (KV-cache decoding, batched):

    python -m alpacare_jax.infer.generate --model=HF_DIR_OR_WORKDIR --dataset=medinstruct_test|icliniq|FILE --out=FILE

writes `[{id, instruction, input, output, generator}]` in dataset order, what `data_gen judge` reads.
`--dataset` is a built TFDS test set (`--data_dir`, see `python -m alpacare_jax.data.build`) or a JSON /
JSONL file of `{instruction, input?, id?}`. Prompts are exactly the training prompts (Alpaca template,
BOS, no EOS). Decoding is greedy unless `--temperature` is set.

Resumable: every answered batch is appended at once to `OUT.partial.jsonl`; a rerun after a crash or
kill answers only the rows not stored there (or in an existing OUT), and the final JSON is written
atomically, so nothing already answered is lost or recomputed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
from tqdm.auto import tqdm

from alpacare_jax.data.pipeline import open_split
from alpacare_jax.data.prompts import prompt_ids
from alpacare_jax.infer.cli import (
    DEFAULT_MAX_NEW_TOKENS,
    add_model_flags,
    add_sampling_flags,
    sampling_from_args,
    setup_logging,
)
from alpacare_jax.infer.completion import complete
from alpacare_jax.infer.loading import LoadedModel, load_model
from alpacare_jax.model import SamplingConfig
from data_gen import DataError, JsonlStore, read_records, write_json_atomic

log = logging.getLogger(__name__)

TEST_SETS = ("medinstruct_test", "icliniq")
TFDS_NAME = "medinstruct"


@dataclasses.dataclass(frozen=True)
class Task:
    """One row to answer; `references` holds the reference models' answers of the TFDS test sets."""

    id: int | str
    instruction: str
    input: str = ""
    references: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return json.dumps(self.id)


# ---- datasets -------------------------------------------------------------------------------------------

def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_test_set(name: str, data_dir: str | None) -> list[Task]:
    """The rows of a built TFDS test set (`medinstruct_test` or `icliniq`), in release-file order."""
    source = open_split(ml_collections.ConfigDict({"dataset": f"{TFDS_NAME}/{name}", "data_dir": data_dir or ""}),
                        "test")
    tasks = []
    for i in range(len(source)):
        row = source[i]
        tasks.append(Task(id=int(row["id"]), instruction=_text(row["instruction"]), input=_text(row["input"]),
                          references={m: _text(a) for m, a in row["references"].items()}))
    return tasks


def load_task_file(path: str | Path) -> list[Task]:
    """Rows of a JSON list or JSONL file of `{instruction, input?, id?}`; ids default to positions.

    A bad row raises `DataError` naming the file, the record and the field.
    """
    tasks, seen = [], {}
    for i, record in enumerate(read_records(path)):
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise DataError(path, i, "instruction", "missing, empty or not a string")
        input_text = record.get("input")
        if input_text is not None and not isinstance(input_text, str):
            raise DataError(path, i, "input", f"expected a string, got {type(input_text).__name__}")
        task_id = record.get("id", i)
        if isinstance(task_id, bool) or not isinstance(task_id, (int, str)):
            raise DataError(path, i, "id", f"expected an integer or a string, got {type(task_id).__name__}")
        task = Task(id=task_id, instruction=instruction, input=input_text or "")
        if task.key in seen:
            raise DataError(path, i, "id", f"duplicate id {task_id!r} (also record {seen[task.key]})")
        seen[task.key] = i
        tasks.append(task)
    return tasks


def load_tasks(dataset: str, *, data_dir: str | None = None, limit: int | None = None) -> list[Task]:
    """`dataset` is a TFDS test set name or a file; `limit` keeps the first N rows."""
    if dataset in TEST_SETS:
        tasks = load_test_set(dataset, data_dir)
    elif Path(dataset).is_file():
        tasks = load_task_file(dataset)
        if not tasks:  # an empty answer file would look like a finished run
            raise DataError(dataset, None, None, "holds no tasks")
    else:
        raise DataError(dataset, None, None, f"neither one of {TEST_SETS} nor an existing file")
    return tasks[:limit] if limit is not None else tasks


# ---- generation -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerationStats:
    total: int
    already_done: int
    answered: int
    truncated_prompts: int
    seconds: float

    def line(self) -> str:
        rate = self.answered / self.seconds if self.seconds else 0.0
        return (f"{self.answered} answered ({rate:.2f}/s), {self.already_done} already done, {self.total} total"
                + (f"; {self.truncated_prompts} prompts truncated to fit the context"
                   if self.truncated_prompts else ""))


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def _stored(out: Path) -> dict[str, dict]:
    """Answers a previous run already wrote to the final OUT (a finished run that is being extended)."""
    if not out.exists():
        return {}
    return {json.dumps(r.get("id")): r for r in read_records(out)}


def _answers(record: dict, task: Task) -> bool:
    """Whether a stored output record was written for `task` (same instruction and input under its id)."""
    return (record.get("instruction"), record.get("input")) == (task.instruction, task.input)


def answered_all(out: str | Path, tasks: Sequence[Task]) -> bool:
    """Whether a finished `out` already answers every task, so a caller need not load the model at all."""
    stored = _stored(Path(out))
    return all(t.key in stored and _answers(stored[t.key], t) for t in tasks)


def generate_outputs(loaded: LoadedModel, tasks: Sequence[Task], out: str | Path, sampling: SamplingConfig, *,
                     batch_size: int = 16, progress: bool = True) -> GenerationStats:
    """Answers the `tasks` not yet stored for `out`, then writes `out` (a JSON list in task order).

    Batches are formed from prompts of similar length (less
    padding); with sampling, each batch's seed is derived from `sampling.seed` and its first row's id,
    so it does not depend on which rows an interrupted run had finished.
    """
    out = Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    done = _stored(out)
    start = time.perf_counter()
    answered = truncated = 0
    with JsonlStore(partial_path(out), key_field="key") as store:
        done.update({key: {k: v for k, v in r.items() if k != "key"} for key, r in store.records.items()})
        for t in tasks:
            stored = done.get(t.key)
            if stored is not None and not _answers(stored, t):
                raise DataError(out if t.key not in store else store.path, None, "id",
                                f"holds another task under id {t.id!r}: was it written for another dataset? "
                                "Choose another --out or delete it")
        pending = [t for t in tasks if t.key not in done]
        already = len(tasks) - len(pending)
        prompts = {t.key: prompt_ids(loaded.tokenizer, t.instruction, t.input) for t in pending}
        pending.sort(key=lambda t: -len(prompts[t.key]))  # longest first: a too-large batch fails at once
        bar = tqdm(total=len(tasks), initial=already, desc=f"generate {loaded.name}", unit="row", disable=not progress)
        for begin in range(0, len(pending), batch_size):
            batch = pending[begin:begin + batch_size]
            seed = (sampling.seed + zlib.crc32(batch[0].key.encode())) % 2**31
            completions = complete(loaded.model, loaded.tokenizer, [prompts[t.key] for t in batch],
                                   dataclasses.replace(sampling, seed=seed))
            for task, completion in zip(batch, completions):
                record = {"id": task.id, "instruction": task.instruction, "input": task.input,
                          "output": completion.text.strip(), "generator": loaded.name}
                store.append({"key": task.key, **record})
                done[task.key] = record
                truncated += completion.prompt_truncated
            answered += len(batch)
            bar.update(len(batch))
        bar.close()
    write_json_atomic(out, [done[t.key] for t in tasks])
    os.remove(partial_path(out))
    if truncated:
        log.warning("%d prompts were longer than the model's context allows and lost tokens after BOS", truncated)
    return GenerationStats(total=len(tasks), already_done=already, answered=answered, truncated_prompts=truncated,
                           seconds=time.perf_counter() - start)


# ---- command line ---------------------------------------------------------------------------------------

def answer_dataset(model: str | Path, dataset: str, out: str | Path, *, data_dir: str | None = None,
                   limit: int | None = None, name: str | None = None, step: int | None = None,
                   dtype: str | None = None, sampling: SamplingConfig | None = None, batch_size: int = 16,
                   progress: bool = True) -> GenerationStats:
    """What `alpacare-generate` does: `model`'s answers to `dataset` (see the module docstring) in `out`.

    The tasks are read and checked before the model is loaded, so bad input fails in seconds. Decoding is
    greedy unless `sampling` says otherwise.
    """
    sampling = sampling or SamplingConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    tasks = load_tasks(dataset, data_dir=data_dir, limit=limit)
    loaded = load_model(model, step=step, dtype=dtype, name=name)
    return generate_outputs(loaded, tasks, out, sampling, batch_size=batch_size, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alpacare-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory or training workdir")
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(TEST_SETS)} (TFDS) or a JSON/JSONL file")
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory of the test sets (default: TFDS's)")
    parser.add_argument("--name", default=None, help="the outputs' `generator` (default: the model directory's name)")
    parser.add_argument("--limit", type=int, default=None, help="answer only the first N rows")
    parser.add_argument("--no_progress", action="store_true")
    add_model_flags(parser)
    add_sampling_flags(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        stats = answer_dataset(args.model, args.dataset, args.out, data_dir=args.data_dir, limit=args.limit,
                               name=args.name, step=args.step, dtype=args.dtype, sampling=sampling_from_args(args),
                               batch_size=args.batch_size, progress=not args.no_progress)
    except (DataError, FileNotFoundError, ValueError) as e:  # bad input (2), or a model that cannot load (1)
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, DataError) else 1
    print(f"{stats.line()} -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
