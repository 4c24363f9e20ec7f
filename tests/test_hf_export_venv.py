"""The HF export where it will be used: a fresh virtual environment holding only torch and transformers
(no protobuf, no sentencepiece, none of this project) loads it with `AutoTokenizer` and
`AutoModelForCausalLM` and answers greedily with exactly our tokens.

Also: the `tokenizer.json` written beside `tokenizer.model` tokenizes varied text exactly as the
sentencepiece model does (unicode, digits, whitespace runs, characters only byte fallback can encode).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infer.fixtures import GROUP, trained  # noqa: F401 (fixtures)

pytestmark = GROUP

PROMPT = "Which vitamins are fat-soluble?"
MAX_NEW_TOKENS = 24

VARIED_TEXTS = [
    "Take 2 tablets (500 mg) every 8 hours; max 4,000 mg/day.",
    "a  b   c    d", "  leading spaces", "trailing spaces   ", "tabs\tand\nnew\n\nlines\r\n",
    "é ü ß naïve Zürich Ωmega ÆØÅ", "日本語の文章 and 中文", "emoji 🙂🩺💊 and symbols ± ≤ ≥ µg",
    "", " ", "   ", "\u00a0non-breaking\u200bzero-width", "x" * 60, "\x00\x01\x7f control bytes",
    "3.14159e-10 0x1F 1234567890", "▁ a literal metaspace ▁▁",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdeé 1 2\n\t日🙂.,▁-"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(n)]


def test_tokenizer_json_encodes_and_decodes_like_sentencepiece(prepared):  # noqa: F811
    from tokenizers import Tokenizer as FastTokenizer

    from alpacare_jax.data import SAMPLE_JSON
    from alpacare_jax.data.records import read_medinstruct_52k
    from alpacare_jax.data.tokenizer import load_tokenizer

    directory = prepared / "tokenizer"  # written by the trainer's bootstrap, copied into every export
    sp = load_tokenizer(directory / "tokenizer.model")
    fast = FastTokenizer.from_file(str(directory / "tokenizer.json"))
    records, _ = read_medinstruct_52k(SAMPLE_JSON)
    texts = VARIED_TEXTS + _random_texts(300) + [r[k] for r in records[:200] for k in ("instruction", "output")]
    for text in texts:
        ids = sp.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text
        assert fast.decode(ids) == sp.decode(ids), text


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A virtual environment with torch and this machine's transformers version, nothing else of ours."""
    import transformers

    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0",
                           f"transformers=={transformers.__version__}"], env=_BARE_ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return python


# Nothing of this checkout may leak into the environment through the import path.
_BARE_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


_VENV_SCRIPT = """
import importlib.util, json, sys
import torch, transformers
present = [m for m in ("google.protobuf", "sentencepiece", "alpacare_jax") if importlib.util.find_spec(m.split(".")[0])]
export, prompt, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = transformers.AutoTokenizer.from_pretrained(export)
model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
new = out[0, ids.shape[1]:].tolist()
print(json.dumps({"present": present, "prompt_ids": ids[0].tolist(), "new_ids": new,
                  "prompt_text": tokenizer.decode(ids[0], skip_special_tokens=True)}))
"""


@pytest.mark.slow
def test_export_loads_and_generates_in_a_bare_venv(trained, bare_venv, tmp_path):  # noqa: F811
    from alpacare_jax.data.prompts import format_prompt
    from alpacare_jax.infer.loading import load_model
    from alpacare_jax.model import SamplingConfig
    from alpacare_jax.model.decode import generate

    export = trained / "hf"
    assert (export / "tokenizer.json").exists() and (export / "tokenizer.model").exists()
    loaded = load_model(export)
    prompt_text = format_prompt(PROMPT, None)
    prompt = loaded.tokenizer.encode(prompt_text, bos=True)
    [ours] = generate(loaded.model, [prompt], SamplingConfig(max_new_tokens=MAX_NEW_TOKENS),
                      eos_ids=(loaded.tokenizer.eos_id,))

    script = tmp_path / "load_export.py"
    script.write_text(_VENV_SCRIPT)
    proc = subprocess.run([str(bare_venv), str(script), str(export), prompt_text, str(MAX_NEW_TOKENS)],
                          env=_BARE_ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs["present"] == [], f"the environment is not bare: {theirs['present']}"
    assert theirs["prompt_ids"] == prompt
    assert theirs["new_ids"] == list(ours), (theirs["new_ids"], ours)
    assert len(ours) > 3
    # Decoding agrees on text; the tiny model's answer is mostly stray byte tokens, which the two libraries
    # render differently when they do not form UTF-8 (one U+FFFD per byte or per sequence).
    assert theirs["prompt_text"] == prompt_text
