"""Tokenizer backends: exact round trips, byte fallback, determinism, HF AutoTokenizer compatibility."""

import pytest

from alpacare_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_tokenizer

from .conftest import SAMPLE_JSON

TEXTS = [
    "Take 500 mg paracetamol every 6 hours; max 4 g/day.",
    "Temperature 38.5 C,\n\tHbA1c 7.2%  (double  spaces kept)",
    "Unseen characters fall back to bytes: 漢字, naïve, ✓, 🙂",
]


def test_sentencepiece_layout_is_llama_like(sp_tokenizer):
    assert isinstance(sp_tokenizer, SentencePieceTokenizer)
    assert (sp_tokenizer.bos_id, sp_tokenizer.eos_id, sp_tokenizer.pad_id) == (1, 2, 0)
    assert sp_tokenizer.vocab_size == 1024


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip_is_exact(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == sp_tokenizer.bos_id and ids[-1] == sp_tokenizer.eos_id
    assert sp_tokenizer.decode(ids) == text
    assert sp_tokenizer.decode(ids, skip_special_tokens=False) == f"<s>{text}</s>"


def test_byte_fallback_encodes_unseen_characters_as_bytes(sp_tokenizer):
    ids = sp_tokenizer.encode("漢")
    pieces = [sp_tokenizer._sp.id_to_piece(i) for i in ids]
    assert pieces[-3:] == ["<0xE6>", "<0xBC>", "<0xA2>"]  # UTF-8 bytes of 漢
    assert sp_tokenizer._sp.unk_id() not in ids


def test_digits_are_split(sp_tokenizer):
    pieces = [sp_tokenizer._sp.id_to_piece(i) for i in sp_tokenizer.encode("2024")]
    assert [p.lstrip("▁") for p in pieces if p.lstrip("▁")] == ["2", "0", "2", "4"]


def test_training_is_deterministic(tmp_path, sp_tokenizer):
    again = train_tokenizer(SAMPLE_JSON, tmp_path, vocab_size=1024)
    assert again.model_file.read_bytes() == sp_tokenizer.model_file.read_bytes()


def test_train_from_texts_and_reject_empty_corpus(tmp_path):
    tok = train_tokenizer(["fever and cough", "chest pain at rest"] * 20, tmp_path / "a", vocab_size=300)
    assert tok.decode(tok.encode("chest pain")) == "chest pain"
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], tmp_path / "b")


def test_saved_sentencepiece_loads_in_transformers_with_the_same_ids(tmp_path, sp_tokenizer):
    transformers = pytest.importorskip("transformers")
    sp_tokenizer.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(TEXTS[0]) == sp_tokenizer.encode(TEXTS[0])
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id) == (sp_tokenizer.bos_id, sp_tokenizer.eos_id)
    for text in TEXTS + ["Below is an instruction.\n\n### Response:"]:
        assert hf(text)["input_ids"] == sp_tokenizer.encode(text, bos=True)


def test_hf_tokenizer_json_backend(hf_tokenizer_dir, tmp_path):
    tok = load_tokenizer(hf_tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # found by their LLaMA-3 names
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 0 and ids[-1] == 1
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == f"<|begin_of_text|>{text}<|end_of_text|>"
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]

    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert hf(TEXTS[0], add_special_tokens=False)["input_ids"] == tok.encode(TEXTS[0])


def test_load_tokenizer_prefers_sentencepiece_and_reports_missing_files(tmp_path, sp_tokenizer, hf_tokenizer_dir):
    both = tmp_path / "both"
    sp_tokenizer.save(both)
    (both / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(empty)
