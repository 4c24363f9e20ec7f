"""A synthetic multiple-choice set whose answer only the contexts carry (for the training tests).

Every question reads alike and its four options are drawn at random from one list of drugs, so without
context nothing tells the right option apart (accuracy near 1/4). The per-option context line says
"indicated" for the right option and "contraindicated" for the others, a few tokens before the end of
the row, so the model has to attend back to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DRUGS = ("aspirin", "heparin", "warfarin", "insulin", "metformin", "atenolol", "digoxin", "morphine",
         "lisinopril", "furosemide", "amoxicillin", "prednisone", "albuterol", "omeprazole", "naloxone",
         "clopidogrel", "amiodarone", "vancomycin", "ceftriaxone", "dopamine")
QUESTIONS = ("Which drug is the best choice?", "Which medication should be started first?",
             "Which treatment is most appropriate?")


def write_medqa(path: Path, contexts_path: Path | None, num_questions: int, seed: int) -> None:
    """MedQA-format JSONL (no `id` fields: ids are line numbers) and, when asked, its CONTEXTS JSONL."""
    rng = np.random.default_rng(seed)
    lines, contexts = [], []
    for i in range(num_questions):
        options = rng.choice(len(DRUGS), 4, replace=False)
        answer = int(rng.integers(4))
        letters = "ABCD"
        lines.append({"question": QUESTIONS[int(rng.integers(len(QUESTIONS)))],
                      "options": {letters[j]: DRUGS[o] for j, o in enumerate(options)},
                      "answer_idx": letters[answer], "meta_info": "step1"})
        contexts.append({
            "id": str(i), "model": "test",
            "overall_context": "An adult patient needs a drug.",
            "option_contexts": {letters[j]: f"{DRUGS[o]} is {'indicated' if j == answer else 'contraindicated'} "
                                            "here." for j, o in enumerate(options)},
            "preliminary_answer": letters[answer],
        })
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    if contexts_path is not None:
        contexts_path.write_text("".join(json.dumps(c) + "\n" for c in contexts))


def mcq_overrides(directory: Path, *, with_context: bool) -> dict:
    """`tiny_config` overrides for a multiple-choice run on the synthetic set written into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {split: (directory / f"{split}.jsonl", directory / f"{split}_contexts.jsonl") for split in ("train", "dev")}
    if not files["train"][0].exists():
        write_medqa(*files["train"], num_questions=256, seed=0)
        write_medqa(*files["dev"], num_questions=64, seed=1)
    return {
        "objective": "multiple_choice",
        "multiple_choice.format": "medqa",
        "multiple_choice.train_file": str(files["train"][0]),
        "multiple_choice.eval_file": str(files["dev"][0]),
        "multiple_choice.train_contexts_file": str(files["train"][1]) if with_context else "",
        "multiple_choice.eval_contexts_file": str(files["dev"][1]) if with_context else "",
        "multiple_choice.num_options": 4,
        "data.max_length": 96,  # no row is cut
        "data.global_batch_size": 8,
    }
