"""A random tiny LLaMA exported for `transformers` (with a real sentencepiece tokenizer), and small local
benchmark files in each dataset's own columns, written here from templates (never copies of the datasets)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alpacare_jax.eval import tasks as tasks_lib

SAMPLE = Path(__file__).resolve().parents[2] / "alpacare_jax" / "data" / "sample" / "medinstruct_sample.json"
WORDS = ("patient", "fever", "insulin", "renal", "cough", "dose", "chronic", "acute", "cardiac", "liver", "the",
         "with", "and", "of", "pain", "therapy", "blood", "pressure", "infection", "children", "nerve", "bone")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A random 2-layer LLaMA (fp32, GQA) saved by transformers, with a sentencepiece tokenizer beside it."""
    import torch

    from alpacare_jax.data.tokenizer import train_tokenizer
    from tests.hf_fixtures import make_hf_model

    out = tmp_path_factory.mktemp("tiny_hf")
    tokenizer = train_tokenizer(SAMPLE, out, vocab_size=512)
    model = make_hf_model("gqa_2kv", seed=3, vocab_size=tokenizer.vocab_size)
    # A random model emits sentencepiece's byte-fallback tokens as often as words, in sequences that are
    # not UTF-8; sentencepiece and HF's converted tokenizer render those differently (per byte vs per run),
    # a tokenizer difference, not the model's. Near-zero output rows for them keep greedy text to words.
    byte_ids = [i for i in range(tokenizer.vocab_size) if tokenizer._sp.is_byte(i)]
    with torch.no_grad():
        model.lm_head.weight[byte_ids] *= 0.01
    model.save_pretrained(out)
    return out


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def _record(task: str, split: str, i: int, rng: random.Random) -> dict:
    """One record in the columns of `task`'s dataset."""
    options = [_text(rng, rng.randint(1, 4)) for _ in range(4)]
    if task == "medqa_4options":
        return {"id": f"q{i}", "sent1": _text(rng, 12) + "?", "sent2": "",
                **{f"ending{k}": o for k, o in enumerate(options)}, "label": rng.randrange(4)}
    if task == "headqa_en":
        return {"name": "Cuaderno_2013_1_B", "year": "2013", "category": "biology", "qid": i,
                "qtext": _text(rng, 10) + "?", "ra": rng.randint(1, 4), "image": "",
                "answers": [{"aid": k + 1, "atext": o} for k, o in enumerate(options)]}
    if task == "pubmedqa":
        # One abstract far longer than the tiny model's context: the backends must truncate it from the left.
        contexts = [_text(rng, 300 if i == 0 else 20), _text(rng, 15)]
        return {"QUESTION": _text(rng, 8) + "?", "CONTEXTS": contexts, "LABELS": ["BACKGROUND", "RESULTS"],
                "MESHES": ["Humans"], "YEAR": "2001", "reasoning_required_pred": "yes",
                "reasoning_free_pred": "yes", "final_decision": rng.choice(["yes", "no", "maybe"]),
                "LONG_ANSWER": _text(rng, 10)}
    if task == "medmcqa":
        return {"id": f"m{i}", "question": _text(rng, 9) + "?", "opa": options[0], "opb": options[1], "opc": options[2],
                "opd": options[3], "cop": rng.randrange(4), "choice_type": "single", "exp": _text(rng, 5),
                "subject_name": "Medicine", "topic_name": "Renal"}
    if task.startswith("mmlu_"):
        return {"question": _text(rng, 9) + "?", "subject": task.removeprefix("mmlu_"), "choices": options,
                "answer": rng.randrange(4)}
    if task == "meqsum_rouge_l":
        return {"File": f"{i}.xml", "CHQ": "SUBJECT: question MESSAGE: " + _text(rng, 20) + "?",
                "Summary": _text(rng, 6) + "?"}
    if task.startswith("bbh_fewshot_"):
        return {"input": _text(rng, 8), "target": rng.choice(["True", "False", "(A)", "7"])}
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        mc2 = [_text(rng, rng.randint(2, 5)) for _ in range(5)]
        return {"question": _text(rng, 7) + "?",
                "mc1_targets": {"choices": options, "labels": [1, 0, 0, 0]},
                "mc2_targets": {"choices": mc2, "labels": [1, 1, 0, 0, 0]}}  # several true answers
    if task == "wikitext":
        return {"page": " ".join(_text(rng, 60) + " ." for _ in range(rng.randint(2, 6)))}
    if task == tasks_lib.ALPACA_FARM:
        return {"instruction": _text(rng, 8) + "?", "input": "" if i % 2 else _text(rng, 6),
                "output": _text(rng, 15), "generator": "text_davinci_003", "dataset": "helpful_base",
                "datasplit": "eval"}
    raise KeyError(task)


def write_local_data(data_dir: Path, tasks: list[str], n: int = 4, seed: int = 0) -> Path:
    """DATA_DIR/<task>/<split>.jsonl for the splits each task evaluates and takes shots from."""
    rng = random.Random(seed)
    for task in tasks:
        if task == tasks_lib.ALPACA_FARM:
            splits = ["eval"]
        else:
            config = tasks_lib.resolved_config(task)
            splits = [config.get("test_split") or config["validation_split"]]
            if config.get("fewshot_split"):
                splits.append(config["fewshot_split"])
        for split in dict.fromkeys(splits):
            path = data_dir / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(_record(task, split, i, rng)) + "\n" for i in range(n)),
                            encoding="utf-8")
    return data_dir
