"""Multiple-choice questions: readers for MedQA, HEAD-QA and MedMCQA, contexts, and the input pipeline.

The multiple-choice objective (`alpacare_jax.train.objectives`) scores every option of a question
with the text

    Question: {question}
    Answer: {option}
    Context: {overall context}
    {option context}

(the two context lines only when the split has a CONTEXTS file), truncated to `max_length` tokens the way
a tokenizer truncates a text pair "longest first": tokens are cut from the end of the longer of the
question part and the answer part until the row fits. The model pools the last real token of each
row, so right padding never changes a score.

Readers take the datasets' released files as they are and fail with one line naming the file, the
record and the field:
  MedQA (USMLE)  JSONL, one question per line: `question`, `options` {"A": ..., ...}, `answer_idx` "A".
  HEAD-QA        the released JSON (English files): {"exams": {EXAM: {"data": [{"qid", "qtext", "ra",
                 "answers": [{"aid", "atext"}, ...]}, ...]}, ...}}; `ra` is the right answer's `aid`.
  MedMCQA        JSONL, one question per line: `id`, `question`, `opa`..`opd`, `cop` (1-4: opa..opd).
Question ids (what CONTEXTS lines are joined on): the record's own `id` when it has one (MedMCQA,
MedQA files that carry one), `EXAM/qid` for HEAD-QA, else the 0-based line number in its file.

CONTEXTS lines (written by `data_gen contexts`): {"id", "overall_context", "option_contexts":
{"A": ..., ...}, "preliminary_answer", "model"}.

THE BATCH (what the objective consumes), per global batch of B questions with up to O options:
  input_ids  int32 [B, O, max_length]  one right-padded row per option
  lengths    int32 [B, O]              real tokens per row; 0 = no such option (or a padding question)
  label      int32 [B]                 index of the right option
  weight     int32 [B]                 1 for a real question, 0 for evaluation padding
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from alpacare_jax.data.tokenizer import Tokenizer

FORMATS = ("medqa", "headqa", "medmcqa")
BATCH_KEYS = ("input_ids", "lengths", "label", "weight")
LETTERS = "ABCDEFGHIJ"


class DataError(ValueError):
    """A record that cannot be read; the message names the file, the record and the field."""


def default_config() -> ml_collections.ConfigDict:
    """The `multiple_choice` section of a training config (used when `objective="multiple_choice"`).

    Row length, questions per step, shuffle seed and reader threads come from the `data` section
    (`data.max_length`, `data.global_batch_size`, `data.seed`, `data.read_threads`).
    """
    c = ml_collections.ConfigDict()
    c.format = "medqa"  # medqa | headqa | medmcqa (see alpacare_jax/data/multiple_choice.py)
    c.train_file = ""  # the training split in its released format
    c.eval_file = ""  # the dev split: evaluated every `eval_every` steps, drives early stopping
    # The test split where its answers are released (MedQA, HEAD-QA; not MedMCQA): evaluated beside the dev
    # split at every evaluation and logged as test_accuracy, so the test accuracy of the dev-selected
    # evaluation can be read from metrics.jsonl (alpacare_jax.eval.context_study); "" = none.
    c.test_file = ""
    # CONTEXTS JSONL of each split (`data_gen contexts` run on that split's file: ids are per file);
    # all "" = train and evaluate without context.
    c.train_contexts_file = ""
    c.eval_contexts_file = ""
    c.test_contexts_file = ""
    c.num_options = 4  # options per question in a batch; questions with fewer get empty rows
    c.train_size = 0  # 0 = every training question; N = a random subset of N (few-shot; MedMCQA: 10k)
    c.subset_seed = 0  # which random subset (the few-shot runs use splits 0, 1 and 2)
    return c


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: tuple[str, ...]  # in label order: A, B, ...
    answer: int  # index into options
    overall_context: str = ""
    option_contexts: tuple[str, ...] = ()  # one per option when contexts are attached


# ---- readers -----------------------------------------------------------------------------------------

def _field(record: Mapping[str, Any], name: str, where: str, kind: type = str) -> Any:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if kind is str and not (isinstance(value, str) and value.strip()):
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    if kind is not str and not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _json_lines(path: Path) -> list[tuple[int, dict]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number + 1}: not JSON ({err.msg})") from None
    return records


def read_medqa(path: str | Path) -> list[Question]:
    """MedQA (USMLE) JSONL: `question`, `options` {"A": text, ...}, `answer_idx` (a key of options)."""
    path = Path(path)
    questions = []
    for number, record in _json_lines(path):
        where = f"{path}: line {number + 1}"
        options = _field(record, "options", where, dict)
        letters = sorted(options)
        if len(letters) < 2 or letters != list(LETTERS[:len(letters)]):
            raise DataError(f"{where}: field 'options' must have keys A, B, ... in sequence, got {list(options)}")
        for letter in letters:
            _field(options, letter, f"{where}: options", str)
        answer = _field(record, "answer_idx", where)
        if answer not in options:
            raise DataError(f"{where}: field 'answer_idx' is {answer!r}, not one of the options {letters}")
        qid = str(record.get("id", number))
        questions.append(Question(qid, _field(record, "question", where), tuple(options[k] for k in letters),
                                  letters.index(answer)))
    return questions


def read_headqa(path: str | Path) -> list[Question]:
    """HEAD-QA's released JSON: exams, each with `data` questions (`qid`, `qtext`, `ra`, `answers`)."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not JSON ({err.msg} at line {err.lineno})") from None
    exams = _field(content, "exams", str(path), dict)
    questions = []
    for exam_name, exam in exams.items():
        for i, record in enumerate(_field(exam, "data", f"{path}: exam {exam_name!r}", list)):
            where = f"{path}: exam {exam_name!r} question {i}"
            qid = _field(record, "qid", where, int)
            where = f"{path}: exam {exam_name!r} qid {qid}"
            answers = _field(record, "answers", where, list)
            aids = [_field(a, "aid", f"{where}: answers[{j}]", int) for j, a in enumerate(answers)]
            if aids != list(range(1, len(aids) + 1)) or len(aids) < 2:
                raise DataError(f"{where}: field 'answers' must have aid 1, 2, ... in order, got {aids}")
            right = _field(record, "ra", where, int)
            if right not in aids:
                raise DataError(f"{where}: field 'ra' is {right}, not one of the answer ids {aids}")
            options = tuple(_field(a, "atext", f"{where}: answers[{j}]") for j, a in enumerate(answers))
            questions.append(Question(f"{exam_name}/{qid}", _field(record, "qtext", where), options, right - 1))
    return questions


def read_medmcqa(path: str | Path) -> list[Question]:
    """MedMCQA JSONL: `id`, `question`, options `opa`..`opd`, `cop` = 1..4 for opa..opd."""
    path = Path(path)
    questions = []
    for number, record in _json_lines(path):
        where = f"{path}: line {number + 1}"
        options = tuple(_field(record, key, where) for key in ("opa", "opb", "opc", "opd"))
        right = _field(record, "cop", where, int)
        if not 1 <= right <= 4:
            raise DataError(f"{where}: field 'cop' is {right}; the released files number the options 1-4")
        qid = str(record.get("id", number))
        questions.append(Question(qid, _field(record, "question", where), options, right - 1))
    return questions


READERS = {"medqa": read_medqa, "headqa": read_headqa, "medmcqa": read_medmcqa}


def read_questions(path: str | Path, format: str) -> list[Question]:
    if format not in READERS:
        raise ValueError(f"multiple_choice.format={format!r}; choose one of {FORMATS}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{format} file {path}: no such file")
    return READERS[format](path)


def read_contexts(path: str | Path) -> dict[str, dict]:
    """CONTEXTS JSONL lines by question id (a later line for the same id replaces an earlier one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"contexts file {path}: no such file")
    contexts = {}
    for number, record in _json_lines(path):
        where = f"{path}: line {number + 1}"
        qid = record.get("id") if isinstance(record, Mapping) else None
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise DataError(f"{where}: field 'id' must be a string or an integer, got {qid!r}")
        _field(record, "overall_context", where)
        _field(record, "option_contexts", where, dict)
        contexts[str(qid)] = record
    return contexts


def attach_contexts(questions: Sequence[Question], contexts: Mapping[str, dict], source: str) -> list[Question]:
    """Each question with its overall and per-option contexts; every question must have them."""
    out = []
    for question in questions:
        record = contexts.get(question.id)
        if record is None:
            raise DataError(f"{source}: no context for question id {question.id!r} "
                            f"({sum(q.id not in contexts for q in questions)} of {len(questions)} questions lack one)")
        per_option = []
        for letter in LETTERS[:len(question.options)]:
            text = record["option_contexts"].get(letter)
            if not isinstance(text, str):
                raise DataError(f"{source}: id {question.id!r}: field 'option_contexts' has no text for "
                                f"option {letter}")
            per_option.append(text)
        out.append(dataclasses.replace(question, overall_context=record["overall_context"],
                                       option_contexts=tuple(per_option)))
    return out


def subset(questions: Sequence[Question], size: int, seed: int) -> list[Question]:
    """`size` questions drawn at random (seeded), in file order; 0 or more than there are = all of them."""
    if size <= 0 or size >= len(questions):
        return list(questions)
    keep = np.sort(np.random.default_rng(seed).permutation(len(questions))[:size])
    return [questions[i] for i in keep]


SPLITS = ("train", "eval", "test")  # config fields `{split}_file` and `{split}_contexts_file`


def load_split(mc_config: ml_collections.ConfigDict, split: str) -> list[Question]:
    """The training ("train": subset applied), dev ("eval") or test ("test") questions of a config, contexts
    attached."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; choose one of {SPLITS}")
    path = mc_config[f"{split}_file"]
    contexts_file = mc_config[f"{split}_contexts_file"]
    if not path:
        raise ValueError(f"config.multiple_choice.{split}_file is not set")
    questions = read_questions(path, mc_config.format)
    if split == "train":
        questions = subset(questions, mc_config.train_size, mc_config.subset_seed)
    too_many = [q.id for q in questions if len(q.options) > mc_config.num_options]
    if too_many:
        raise DataError(f"{path}: question id {too_many[0]!r} has more options than "
                        f"multiple_choice.num_options={mc_config.num_options}")
    if contexts_file:
        questions = attach_contexts(questions, read_contexts(contexts_file), contexts_file)
    return questions


# ---- encoding ----------------------------------------------------------------------------------------

def option_texts(question: Question) -> list[tuple[str, str]]:
    """(question part, answer part) of every option's row (see the module doc for the layout)."""
    first = f"Question: {question.question}\n"
    rows = []
    for i, option in enumerate(question.options):
        second = f"Answer: {option}"
        if question.option_contexts:
            second += f"\nContext: {question.overall_context}\n{question.option_contexts[i]}"
        rows.append((first, second))
    return rows


def truncate_pair(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cuts tokens from the end of the longer part until both fit in `budget` ("longest first")."""
    excess = len(first) + len(second) - budget
    if excess <= 0:
        return first, second
    a, b = len(first), len(second)
    for _ in range(excess):
        if a > b:
            a -= 1
        else:
            b -= 1
    return first[:a], second[:b]


class QuestionEncoder:
    """Question -> {input_ids [O, L], lengths [O], label, weight}: BOS + the two parts, right-padded."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, num_options: int):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer, self.max_length, self.num_options = tokenizer, max_length, num_options

    def __call__(self, question: Question) -> dict[str, np.ndarray]:
        out = empty_question(self.max_length, self.num_options, self.tokenizer.pad_id)
        pairs = option_texts(question)
        encoded = self.tokenizer.encode_batch([text for pair in pairs for text in pair])
        for i in range(len(pairs)):
            first, second = truncate_pair(encoded[2 * i], encoded[2 * i + 1], self.max_length - 1)
            tokens = [self.tokenizer.bos_id] + first + second
            out["input_ids"][i, :len(tokens)] = tokens
            out["lengths"][i] = len(tokens)
        out["label"][...] = question.answer
        out["weight"][...] = 1
        return out


def empty_question(max_length: int, num_options: int, pad_id: int) -> dict[str, np.ndarray]:
    """A question slot that counts for nothing (evaluation padding)."""
    return {"input_ids": np.full((num_options, max_length), pad_id, np.int32),
            "lengths": np.zeros((num_options,), np.int32),
            "label": np.zeros((), np.int32), "weight": np.zeros((), np.int32)}


# ---- pipelines ---------------------------------------------------------------------------------------

def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    return global_batch_size // process_count


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                        questions: Sequence[Question] | None = None, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """This process's training batches, reshuffled every epoch; resumable like the SFT pipeline's.

    `config` is the whole training config (its `data` and `multiple_choice` sections).
    """
    data, mc = config.data, config.multiple_choice
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    questions = load_split(mc, "train") if questions is None else questions
    ds = grain.MapDataset.source(list(questions))[index::count]
    if len(ds) == 0:
        raise ValueError(f"process {index} has no training questions (split has {len(questions)})")
    ds = ds.shuffle(seed=data.seed).repeat(data.num_epochs or None)
    ds = ds.map(QuestionEncoder(tokenizer, data.max_length, mc.num_options))
    ds = ds.batch(_local_batch(data.global_batch_size, count), drop_remainder=True)
    read = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch_buffer_size)
    return iter(ds.to_iter_dataset(read))


def make_eval_iterator(config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, split: str = "eval",
                       questions: Sequence[Question] | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
    """Every question of the dev ("eval") or test split once, in order; padded with weight-0 questions to
    equal batch counts per process."""
    data, mc = config.data, config.multiple_choice
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    questions = load_split(mc, split) if questions is None else questions
    local = _local_batch(data.eval_global_batch_size or data.global_batch_size, count)
    mine = list(questions)[index::count]
    num_rows = math.ceil(math.ceil(len(questions) / count) / local) * local
    encode = QuestionEncoder(tokenizer, data.max_length, mc.num_options)

    def row(j: int) -> dict[str, np.ndarray]:
        return encode(mine[j]) if j < len(mine) else empty_question(data.max_length, mc.num_options, tokenizer.pad_id)

    ds = grain.MapDataset.range(num_rows).map(row).batch(local)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads)))


def steps_per_epoch(config: ml_collections.ConfigDict, *, process_count: int = 1) -> int:
    """Full global batches in one pass over the training questions (process 0's shard, the largest)."""
    questions = load_split(config.multiple_choice, "train")
    return math.ceil(len(questions) / process_count) // _local_batch(config.data.global_batch_size, process_count)
