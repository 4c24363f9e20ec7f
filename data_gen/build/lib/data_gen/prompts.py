"""Prompts, in this project's own words.

* Task generation follows AlpaCare's scheme (a system prompt, a list of rules, three seed
  tasks shown as examples, a request for N new tasks in a ``###``-separated block format)
  but the wording is ours.
* The judge prompt follows the AlpacaFarm/AlpaCare pairwise idea (which of two outputs is
  better, or a tie), again in our own words. ``JUDGE_PROMPT_VERSION`` is part of the
  annotation cache key, so changing the prompt invalidates cached verdicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FIELDS = ("type", "topic", "view", "difficulty", "instruction", "input")
NO_INPUT = "<noinput>"

GENERATION_SYSTEM = (
    "You are an experienced clinician and medical educator. You write varied, realistic tasks "
    "that a trustworthy medical AI assistant should be able to carry out."
)

GENERATION_RULES = [
    "Every task must differ clearly from the examples and from the other new tasks: do not reword the same request.",
    "Vary how instructions are phrased; do not open many of them with the same verb or question word.",
    "Mix task types: open questions, multiple-choice questions, classification, summarisation, rewriting "
    "for another audience, information extraction, case-based reasoning, text generation and others.",
    "Spread the tasks over many areas of medicine: clinical specialties, pharmacology, laboratory medicine, "
    "public health, medical ethics, nursing, nutrition and more.",
    "Write each task from a stated point of view (View) - for example a medical student, a physician, a nurse, "
    "a researcher, a pharmacist, a patient or a caregiver - and make the wording fit that person.",
    "Rate each task's Difficulty from 1 (a layperson could answer it) to 5 (it needs specialist knowledge), "
    "and use the whole range.",
    "Instructions are in English, one to three sentences, phrased as a request or a question.",
    "When a task needs concrete material (a case description, lab values, a clinical note, an abstract, "
    "answer options), put that material in Input; make it realistic, self-contained and under 150 words.",
    f"Many tasks need no material; write {NO_INPUT} as their Input. Never repeat the instruction in Input.",
    "Only ask for what a text-only assistant can do: no images, audio, physical actions or live data.",
    "Invent any patient details; never describe a real, identifiable person.",
    "Do not write the answer to the task.",
    "An expert should be able to answer each task well in under 250 words.",
    "Keep the medical premises of each task correct, unless the task is explicitly to find an error.",
    "Use exactly the format of the examples for every task: the six fields Type, Topic, View, Difficulty, "
    "Instruction and Input, in that order, each on its own line, with a line containing only ### before "
    "every task.",
]


def format_task(task: Mapping[str, object]) -> str:
    """A task in the block format the model is asked to write."""
    inp = str(task.get("input") or "").strip() or NO_INPUT
    return (f"Type: {task.get('type', '')}\nTopic: {task.get('topic', '')}\nView: {task.get('view', '')}\n"
            f"Difficulty: {task.get('difficulty', '')}\nInstruction: {task.get('instruction', '')}\nInput: {inp}")


def generation_messages(examples: Sequence[Mapping[str, object]], num_tasks: int) -> list[dict]:
    """The chat messages asking for ``num_tasks`` new tasks, with ``examples`` as seeds."""
    rules = "\n".join(f"{i}. {r}" for i, r in enumerate(GENERATION_RULES, 1))
    shown = "\n".join(f"###\n{format_task(t)}" for t in examples)
    user = (f"Write {num_tasks} new medical tasks for an instruction-following assistant.\n\n"
            f"Rules:\n{rules}\n\n"
            f"Examples of the format:\n{shown}\n\n"
            f"Now write the {num_tasks} new tasks, each starting with a line containing only ###.")
    return [{"role": "system", "content": GENERATION_SYSTEM}, {"role": "user", "content": user}]


def has_input(inp: str | None) -> bool:
    return bool(inp and inp.strip() and inp.strip() != NO_INPUT)


def response_messages(instruction: str, inp: str | None) -> list[dict]:
    """AlpaCare's response request: the instruction, then the input if there is one."""
    text = instruction.strip()
    if has_input(inp):
        text += "\n\n" + inp.strip()
    return [{"role": "user", "content": text}]


JUDGE_PROMPT_VERSION = "v1"

JUDGE_SYSTEM = (
    "You are an impartial senior physician who reviews answers written by AI assistants. "
    "You compare two answers to the same request and decide which one serves the person who asked better."
)

JUDGE_TEMPLATE = """Compare the two outputs below, written in response to the same instruction.

Judge them on medical accuracy, helpfulness for the person asking, safety (appropriate caution, no \
harmful advice) and how completely they address the instruction. Longer is not better by itself, and \
the order in which the outputs are shown says nothing about their quality. If they are equally good \
(or equally bad), say Tie.

## Instruction
{instruction}

## Input
{input}

## Output (a)
{output_a}

## Output (b)
{output_b}

## Your verdict
Reply with exactly one of these and nothing else: Output (a), Output (b), Tie"""


def judge_messages(instruction: str, inp: str | None, output_a: str, output_b: str) -> list[dict]:
    user = JUDGE_TEMPLATE.format(instruction=instruction.strip() or "(none)",
                                 input=inp.strip() if has_input(inp) else "(none)",
                                 output_a=output_a.strip(), output_b=output_b.strip())
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
