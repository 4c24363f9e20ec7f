"""Parse generated tasks out of a completion, robustly, and count what had to be rejected.

The model is asked for blocks like::

    ###
    Type: Open Q&A
    Topic: Cardiology
    View: Student
    Difficulty: 2
    Instruction: Explain ...
    Input: <noinput>

Real completions are messier: numbered fields (``4. Instruction:``), markdown bold
(``**Topic:**``), a chatty preamble, multi-line inputs, a forgotten ``###``, a cut-off last
task. AlpaCare's parser shows what goes wrong: ``str.strip("Instructions:")`` removes a
*set of characters*, so "genes" lost its "s"; without a ``###`` the next task ended up in
``Input``; truncated completions were kept. Here:

* field prefixes are removed with anchored regular expressions, never ``strip(chars)``;
* a block that contains a second ``Type:`` header is split into two tasks (a forgotten
  ``###``); any other repeated field means the block swallowed part of another task and the
  block is rejected (``swallowed_next``), as is a field value holding an inline header;
* when ``finish_reason == "length"`` the last task is dropped (``truncated``);
* blocks with no ``Instruction:`` field are ``unparseable``; an empty one is ``empty_instruction``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from .prompts import FIELDS, NO_INPUT

# "###" on its own line (allow "### 5" or "###." which models sometimes write).
_SEPARATOR = re.compile(r"^\s*#{3,}\s*\d*\s*[.:]?\s*$")
# An optional list number, optional markdown emphasis, the field name, a colon.
_HEADER = re.compile(
    r"^\s*(?:[-*]\s+)?(?:\d+\s*[.)]\s*)?[*_]{0,2}\s*(?P<name>" + "|".join(FIELDS) + r")\s*[*_]{0,2}\s*:\s*[*_]{0,2}",
    re.IGNORECASE)
# A header hiding inside a value, e.g. "... <noinput> 5. Type: Open Q&A".
_INLINE_HEADER = re.compile(r"(?:^|\s)(?:\d+\s*[.)]\s*)?(?:" + "|".join(f.capitalize() for f in FIELDS) + r")\s*:\s")
_NO_INPUT_WORDS = {"", "<noinput>", "<no input>", "noinput", "none", "n/a", "na", "no input", "-", "(none)", "null"}


@dataclass(frozen=True)
class Task:
    """One generated task, in MedInstruct-52k's field names."""

    instruction: str
    input: str = NO_INPUT
    type: str = ""
    topic: str = ""
    view: str = ""
    difficulty: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ParseResult:
    tasks: list[Task] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    notes: Counter = field(default_factory=Counter)  # repaired, not rejected (e.g. missing_separator)


def _clean(value: str) -> str:
    """Trim whitespace and markdown emphasis that wraps the whole value (never a character set)."""
    value = value.strip()
    m = re.fullmatch(r"([*_]{1,2})(.*?)\1", value, flags=re.DOTALL)
    if m:
        value = m.group(2).strip()
    return value


def _normalize_input(value: str) -> str:
    v = _clean(value)
    if v.strip("\"'").lower() in _NO_INPUT_WORDS:
        return NO_INPUT
    return v


def _normalize_difficulty(value: str) -> str:
    m = re.search(r"\d+", value)
    return m.group(0) if m else _clean(value)


def _split_blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if _SEPARATOR.match(line):
            blocks.append([])
        else:
            blocks[-1].append(line)
    return [b for b in blocks if any(line.strip() for line in b)]


def _parse_block(lines: list[str], result: ParseResult, first: bool = False) -> list[Task]:
    """Parse one ``###`` block; may yield several tasks if a separator was forgotten.

    A first block without any field header is the model's preamble, not a task.
    """
    tasks: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] | None = None
    last: str | None = None
    swallowed = False
    for line in lines:
        m = _HEADER.match(line)
        if m:
            name = m.group("name").lower()
            rest = line[m.end():]
            if current is None or (name == "type" and "type" in current):
                if current is not None:
                    result.notes["missing_separator"] += 1
                current = {}
                tasks.append(current)
            elif name in current:
                swallowed = True
            current[name] = [rest]
            last = name
        elif current is not None and last is not None:
            current[last].append(line)  # continuation of a multi-line value
        # lines before the first header (a preamble such as "Sure! Here are...") are ignored
    if not tasks:
        if first:
            result.notes["preamble"] += 1
        else:
            result.rejected["unparseable"] += 1
        return []
    if swallowed:
        result.rejected["swallowed_next"] += len(tasks)
        return []
    out = []
    for t in tasks:
        values = {k: "\n".join(v).strip() for k, v in t.items()}
        if "instruction" not in values:
            result.rejected["unparseable"] += 1
            continue
        instruction = _clean(values["instruction"])
        if not instruction:
            result.rejected["empty_instruction"] += 1
            continue
        inp = _normalize_input(values.get("input", ""))
        if _INLINE_HEADER.search(instruction) or _INLINE_HEADER.search(inp):
            result.rejected["swallowed_next"] += 1
            continue
        out.append(Task(instruction=instruction, input=inp, type=_clean(values.get("type", "")),
                        topic=_clean(values.get("topic", "")), view=_clean(values.get("view", "")),
                        difficulty=_normalize_difficulty(values.get("difficulty", ""))))
    return out


def parse_tasks(text: str, finish_reason: str = "stop") -> ParseResult:
    """Parse all tasks in ``text``; with ``finish_reason == "length"`` the last one is rejected."""
    result = ParseResult()
    blocks = _split_blocks(text)
    if finish_reason == "length" and blocks:
        blocks = blocks[:-1]
        result.rejected["truncated"] += 1
    for i, b in enumerate(blocks):
        result.tasks.extend(_parse_block(b, result, first=i == 0))
    return result
