"""Parser tests on realistic messy completions, including each AlpaCare parsing bug."""

from __future__ import annotations

from data_gen.parse import parse_tasks
from data_gen.prompts import format_task, generation_messages


def block(instruction, inp="<noinput>", **kw):
    t = {"type": "Open Q&A", "topic": "Genetics", "view": "Student", "difficulty": "2",
         "instruction": instruction, "input": inp, **kw}
    return "###\n" + format_task(t)


def test_roundtrip_of_seed_tasks(seed_tasks):
    text = "\n".join(block(**{k: t[k] for k in ("instruction",)}, inp=t["input"], type=t["type"], topic=t["topic"],
                           view=t["view"], difficulty=t["difficulty"]) for t in seed_tasks)
    r = parse_tasks(text + "\n###")
    assert not r.rejected
    assert [t.instruction for t in r.tasks] == [s["instruction"].strip() for s in seed_tasks]
    assert [t.input for t in r.tasks] == [s["input"].strip() or "<noinput>" for s in seed_tasks]
    assert [t.topic for t in r.tasks] == [s["topic"] for s in seed_tasks]


def test_strip_charset_bug_trailing_letters_kept():
    # AlpaCare: value.strip("Instructions:") turned "genes" into "gene" and "Insulin" into "ulin".
    r = parse_tasks(block("List disorders caused by mutations in the CFTR and HBB genes",
                          inp="Insulin dose: 10 units; sensitivities: none noted; instructions"))
    assert r.tasks[0].instruction == "List disorders caused by mutations in the CFTR and HBB genes"
    assert r.tasks[0].input == "Insulin dose: 10 units; sensitivities: none noted; instructions"


def test_missing_separator_splits_instead_of_swallowing():
    # AlpaCare: without ### the next task ended up inside the previous task's Input.
    text = block("Classify this ECG.", inp="Rate 150, irregular,\nno P waves.") + "\n" + format_task(
        {"type": "Summarization", "topic": "Oncology", "view": "Patient", "difficulty": "1",
         "instruction": "Summarize what a biopsy is.", "input": "<noinput>"})
    r = parse_tasks(text)
    assert [t.instruction for t in r.tasks] == ["Classify this ECG.", "Summarize what a biopsy is."]
    assert r.tasks[0].input == "Rate 150, irregular,\nno P waves."
    assert r.notes["missing_separator"] == 1 and not r.rejected


def test_swallowed_next_task_is_rejected_and_counted():
    # The next task starts at "Instruction:" (no Type line): the block holds two instructions.
    text = block("Explain gout.") + "\nInstruction: Describe lupus.\nInput: <noinput>\n" + block("Define sepsis.")
    r = parse_tasks(text)
    assert [t.instruction for t in r.tasks] == ["Define sepsis."]
    assert r.rejected["swallowed_next"] == 1
    # ... and a header hidden inline in a value.
    r = parse_tasks(block("Explain asthma.", inp="<noinput> 5. Type: Open Q&A 5. Instruction: Explain COPD."))
    assert r.tasks == [] and r.rejected["swallowed_next"] == 1


def test_truncated_completion_drops_last_task_only():
    text = block("Explain gout.") + "\n" + block("Describe the management of diabetic ketoacido")
    r = parse_tasks(text, finish_reason="length")
    assert [t.instruction for t in r.tasks] == ["Explain gout."]
    assert r.rejected["truncated"] == 1
    # the same text, not truncated, keeps both
    assert len(parse_tasks(text, finish_reason="stop").tasks) == 2


def test_messy_formatting():
    text = """Sure! Here are 4 new tasks:

###
4. Type: Multiple choice
4. Topic: Pharmacology
4. View: Pharmacist
4. Difficulty: 3/5
4. Instruction: Which drug interacts with warfarin?
4. Input: A) Paracetamol B) Fluconazole C) Loratadine
### 5
**Type:** Rewriting
**Topic:** Nephrology
**View:** Patient
**Difficulty:** 2
**Instruction:** Rewrite this discharge note in plain language.
**Input:** "Pt w/ CKD stage 3b, eGFR 38.
Continue ACE-i, recheck K+ in 1/52."
###
type: Open Q&A
TOPIC: Neurology
View: Student
Difficulty: 1
Instruction:
Input: N/A
###
This block has no fields at all.
###
Type: Open Q&A
Topic: Cardiology
View: Nurse
Difficulty: 2
Instruction:   What is **preload**?  
###"""  # noqa: W291 (the trailing spaces are part of the case)
    r = parse_tasks(text)
    assert [t.instruction for t in r.tasks] == ["Which drug interacts with warfarin?",
                                                "Rewrite this discharge note in plain language.",
                                                "What is **preload**?"]
    assert r.tasks[0].difficulty == "3" and r.tasks[0].view == "Pharmacist"
    assert r.tasks[0].input == "A) Paracetamol B) Fluconazole C) Loratadine"
    assert r.tasks[1].type == "Rewriting" and r.tasks[1].input.endswith("recheck K+ in 1/52.\"")
    assert r.tasks[2].input == "<noinput>"
    assert r.rejected == {"empty_instruction": 1, "unparseable": 1}
    assert r.notes["preamble"] == 1


def test_prompt_asks_for_n_tasks_with_three_examples(seed_tasks):
    msgs = generation_messages(seed_tasks[:3], 7)
    user = msgs[-1]["content"]
    assert "7 new tasks" in user and user.count("###") >= 3
    assert all(t["instruction"] in user for t in seed_tasks[:3])
    assert user.count("\n15. ") == 1  # fifteen rules
