"""Model and reference outputs files, read as they are, and the key that pairs two files' answers to one task.

Output files of AlpaCare's release differ in schema: ``output`` (gpt-4, gpt-3.5-turbo,
text-davinci-003), ``response`` (claude-2), a Human/Assistant ``prompt`` instead of
instruction/input (claude-2 on iCliniq), one column per model (MedInstruct-test.jsonl).
``load_outputs`` reads them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .prompts import NO_INPUT
from .store import read_records

OUTPUT_FIELDS = ("output", "response", "completion", "answer")
# claude-2's prompts: "Human: <instruction>\n\n<question>\n\nAssistant:" (one of AlpaCare's 1000 has a single
# newline before "Assistant:").
_CLAUDE_PROMPT = re.compile(r"\s*Human: (?P<header>[^\n]+)\n\n(?P<question>.+?)\n+Assistant:\s*", re.DOTALL)


def parse_claude_prompt(prompt: str) -> tuple[str, str] | None:
    """``(instruction, question)`` of a claude-2 ``Human: ...\\n\\n...\\nAssistant:`` prompt, else None.

    Strict on the form (a one-line instruction, a blank line, the question, ``Assistant:`` on a
    line of its own), so that a prompt of another shape is reported rather than half read: a
    looser reading would move text between the instruction and the question without a word.
    """
    m = _CLAUDE_PROMPT.fullmatch(prompt)
    return (m.group("header").strip(), m.group("question").strip()) if m else None


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    index: int  # position in its file
    id: str | None = None

    @property
    def label(self) -> str:
        """How a summary names this example: its ``id``, else its position in the file."""
        return self.id if self.id is not None else str(self.index)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def text_key(instruction: str, inp: str) -> str:
    """Instruction and input as one normalised string, the key that pairs two files' answers to one task.

    Case and whitespace are ignored, ``<noinput>`` means no input, and ("", q) and (q, "") match.
    """
    inp = "" if inp.strip() == NO_INPUT else inp
    return _norm(f"{instruction} {inp}")


def load_outputs(path: str | Path, field: str | None = None) -> list[Example]:
    """Read model or reference outputs in any of the schemas described in the module docstring.

    claude-2's iCliniq records hold the question in their ``prompt`` only: it becomes the input,
    with no instruction, as in the other reference files of that test set.
    """
    records = read_records(path)
    out = []
    for i, r in enumerate(records):
        if field is not None:
            if field not in r:
                raise DataError(path, i, field, "missing (the output field named by --*_field)")
            output = r[field]
        else:
            name = next((f for f in OUTPUT_FIELDS if f in r), None)
            if name is None:
                raise DataError(path, i, "output", f"none of {OUTPUT_FIELDS} present; pass the field name")
            output = r[name]
        if not isinstance(output, str):
            raise DataError(path, i, field or "output", f"expected a string, got {type(output).__name__}")
        if "instruction" in r or "input" in r:
            instruction, inp = r.get("instruction") or "", r.get("input") or ""
        elif "prompt" in r:
            parsed = parse_claude_prompt(r["prompt"]) if isinstance(r["prompt"], str) else None
            if parsed is None:
                raise DataError(path, i, "prompt", "not in the 'Human: ...\\n\\n<question>\\nAssistant:' form")
            instruction, inp = "", parsed[1]
        else:
            raise DataError(path, i, "instruction", "missing (and no 'prompt' field either)")
        if not isinstance(instruction, str) or not isinstance(inp, str):
            raise DataError(path, i, "instruction", "instruction and input must be strings")
        rid = r.get("id")
        out.append(Example(instruction=instruction, input=inp, output=output, index=i,
                           id=None if rid is None else str(rid)))
    return out
