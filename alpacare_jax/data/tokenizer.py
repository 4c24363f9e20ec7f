"""Tokenizers behind one small interface: LLaMA-1/2 sentencepiece models and HF `tokenizer.json` files.

LLaMA-1/2 ship a sentencepiece `tokenizer.model` (BPE with byte fallback, BOS=1, EOS=2, no pad id);
LLaMA-3 ships only an HF `tokenizer.json` (byte-level BPE, read with the `tokenizers` package). The
data pipeline, generation and HF export use nothing but the `Tokenizer` interface below, so they
work with either. `load_tokenizer` picks the backend from the files present; `train_tokenizer` makes a
small LLaMA-style sentencepiece model for the CPU demo.

Special tokens are never added by the backends themselves: `encode(text, bos=..., eos=...)` adds them
explicitly, so the pipeline knows exactly where the prompt ends and the response begins.
"""

from __future__ import annotations

import abc
import io
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from etils import epath

from alpacare_jax import storage
from alpacare_jax.data.records import read_medinstruct_52k

SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class Tokenizer(abc.ABC):
    """What the pipeline, generation and export need from a tokenizer.

    `pad_id` fills padded positions; those positions always carry `loss_mask` 0 and segment id 0, so
    the id only has to be a valid embedding row (LLaMA-1/2 have no pad token: `<unk>` (0) is used).
    """

    bos_id: int
    eos_id: int
    pad_id: int

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (the model's embedding rows must be at least this many)."""

    @abc.abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS prepended / EOS appended when asked."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts without special tokens; backends override it with a faster batch call."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; with `skip_special_tokens=False` special tokens appear as their text (`</s>`)."""

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write files that both `load_tokenizer` and `transformers.AutoTokenizer` load from `out_dir`
        (a local directory or a gs:// URL)."""
        with storage.local_staging(out_dir) as local:
            self._save(local)

    @abc.abstractmethod
    def _save(self, out_dir: Path) -> None:
        """`save` into a local directory."""


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` (LLaMA-1/2 or one made by `train_tokenizer`)."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.model_file}: sentencepiece model has no BOS or EOS token")
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else max(self._sp.unk_id(), 0)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One C++ call for the whole list; num_threads=1 keeps it on the calling core (the loader's thread).
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode(ids)
        # sentencepiece drops control tokens when decoding; render them as their piece text instead.
        parts, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def _save(self, out_dir: Path) -> None:
        """Writes `tokenizer.model` plus the two JSON files with which HF loads it as a `LlamaTokenizer`."""
        if (out_dir / SENTENCEPIECE_FILE).resolve() != self.model_file.resolve():
            shutil.copyfile(self.model_file, out_dir / SENTENCEPIECE_FILE)
        piece = self._sp.id_to_piece
        special = {"bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id)}
        if self._sp.unk_id() >= 0:
            special["unk_token"] = piece(self._sp.unk_id())
        config = {
            "tokenizer_class": "LlamaTokenizer",
            **special,
            "pad_token": piece(self._sp.pad_id()) if self._sp.pad_id() >= 0 else None,
            "add_bos_token": True,
            "add_eos_token": False,
            # Treat the text the way sentencepiece itself does (no "legacy" space handling).
            "legacy": False,
            "clean_up_tokenization_spaces": False,
        }
        _write_json(out_dir / TOKENIZER_CONFIG_FILE, config)
        _write_json(out_dir / SPECIAL_TOKENS_MAP_FILE, special)
        self.fast_tokenizer().save(str(out_dir / HF_TOKENIZER_FILE))

    def fast_tokenizer(self):
        """The same tokenizer as an HF `tokenizers.Tokenizer` (what `tokenizer.json` holds).

        Released LLaMA checkpoints ship it beside `tokenizer.model` because transformers can build it from
        the sentencepiece model only with protobuf installed. Built the way transformers converts LLaMA's
        model (non-legacy): BPE over the pieces with byte fallback, merges ranked by the merged piece's
        id (sentencepiece merges the best-scored pair first, and its BPE pieces are stored best first),
        "▁" for spaces and one before the text, no other normalisation (this model has none). One difference
        remains, as with every LLaMA `tokenizer.json`: the text "<s>" or "</s>" becomes the special token; and
        byte tokens that do not form UTF-8 decode to a different number of U+FFFD than sentencepiece gives.
        """
        from tokenizers import AddedToken, decoders, models, normalizers, processors
        from tokenizers import Tokenizer as FastTokenizer

        sp = self._sp
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        mergeable = {piece: i for piece, i in vocab.items() if sp.is_unknown(i) + sp.is_control(i) + sp.is_byte(i) == 0}
        merges = sorted(
            ((piece[:cut], piece[cut:], i) for piece, i in mergeable.items() for cut in range(1, len(piece))
             if piece[:cut] in mergeable and piece[cut:] in mergeable),
            key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]),
        )
        fast = FastTokenizer(models.BPE(vocab, [(left, right) for left, right, _ in merges],
                                        unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True, byte_fallback=True))
        # sentencepiece puts "▁" before every text, even one that starts with a space ("add_dummy_prefix").
        fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                          decoders.Strip(content=" ", left=1)])
        fast.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                                 for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)])
        bos = sp.id_to_piece(self.bos_id)  # transformers adds BOS as the post-processor says (add_bos_token)
        fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, self.bos_id)])
        return fast


class HFTokenizer(Tokenizer):
    """An HF `tokenizer.json` (e.g. LLaMA-3), read with the `tokenizers` package.

    BOS/EOS come from the `tokenizer_config.json` next to it when present (LLaMA-3 instruct models
    end turns with `<|eot_id|>`, base models with `<|end_of_text|>`), else from well-known token names.
    """

    _BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>")
    _EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>")

    def __init__(self, tokenizer_file: str | Path):
        from tokenizers import Tokenizer as _HFTokenizer

        self.tokenizer_file = Path(tokenizer_file)
        self._tok = _HFTokenizer.from_file(str(self.tokenizer_file))
        config_file = self.tokenizer_file.with_name(TOKENIZER_CONFIG_FILE)
        self._config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.bos_id = self._special_id("bos_token", self._BOS_NAMES)
        self.eos_id = self._special_id("eos_token", self._EOS_NAMES)
        pad = self._config.get("pad_token")
        self.pad_id = self._token_id(pad) if pad else self.eos_id

    def _token_id(self, token: str | dict) -> int:
        content = token["content"] if isinstance(token, dict) else token
        token_id = self._tok.token_to_id(content)
        if token_id is None:
            raise ValueError(f"{self.tokenizer_file}: special token {content!r} is not in the vocabulary")
        return token_id

    def _special_id(self, key: str, fallbacks: tuple[str, ...]) -> int:
        if self._config.get(key):
            return self._token_id(self._config[key])
        for name in fallbacks:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"{self.tokenizer_file}: cannot tell the {key}: no {TOKENIZER_CONFIG_FILE} names it and none of "
            f"{fallbacks} is in the vocabulary"
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _save(self, out_dir: Path) -> None:
        """Copies `tokenizer.json` and writes a `tokenizer_config.json` naming BOS/EOS/pad."""
        if (out_dir / HF_TOKENIZER_FILE).resolve() != self.tokenizer_file.resolve():
            shutil.copyfile(self.tokenizer_file, out_dir / HF_TOKENIZER_FILE)
        special = {
            "bos_token": self._tok.id_to_token(self.bos_id),
            "eos_token": self._tok.id_to_token(self.eos_id),
            "pad_token": self._tok.id_to_token(self.pad_id),
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self._config, **special}
        _write_json(out_dir / TOKENIZER_CONFIG_FILE, config)
        _write_json(out_dir / SPECIAL_TOKENS_MAP_FILE, special)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer at `path`: a `tokenizer.model` / `tokenizer.json` file or a directory holding one,
    local or at a gs:// URL (its few small files are then copied to a local directory first).

    A directory with both (HF LLaMA-1/2 checkpoints) uses the sentencepiece model, the original.
    """
    if storage.is_url(path):
        remote = epath.Path(path)
        if remote.name in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE):
            local = storage.local_copy(remote.parent, (remote.name, TOKENIZER_CONFIG_FILE))
            return load_tokenizer(local / remote.name)
        return load_tokenizer(storage.local_copy(remote, (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE,
                                                          TOKENIZER_CONFIG_FILE)))
    path = Path(path)
    if path.is_dir():
        for name in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE):
            if (path / name).exists():
                return load_tokenizer(path / name)
        raise FileNotFoundError(f"{path}: no {SENTENCEPIECE_FILE} or {HF_TOKENIZER_FILE} in this directory")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def _corpus_texts(texts_or_json: Iterable[str] | str | Path) -> list[str]:
    """Training sentences: the strings given, or every instruction/input/output of a MedInstruct JSON file."""
    if isinstance(texts_or_json, (str, Path)):
        records, _ = read_medinstruct_52k(texts_or_json)
        return [r[k] for r in records for k in ("instruction", "input", "output") if r[k]]
    return [t for t in texts_or_json if t]


def train_tokenizer(
    texts_or_json: Iterable[str] | str | Path,
    out_dir: str | Path,
    vocab_size: int = 8000,
) -> SentencePieceTokenizer:
    """Trains a LLaMA-style sentencepiece BPE model and saves it (plus HF config files) in `out_dir`.

    Same layout as LLaMA-1/2: `<unk>`=0, `<s>`=1, `</s>`=2, byte fallback (no text is ever `<unk>`),
    digits split one by one, no normalisation (decode(encode(text)) == text). Deterministic: one thread
    and no sentence sampling, so the same corpus always gives the same model bytes. `vocab_size` is an
    upper bound: a small corpus may give fewer pieces.
    """
    import sentencepiece as spm

    texts = _corpus_texts(texts_or_json)
    if not texts:
        source = texts_or_json if isinstance(texts_or_json, (str, Path)) else "the texts given"
        raise ValueError(f"train_tokenizer: {source} is empty: no text to train on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SENTENCEPIECE_FILE).write_bytes(model.getvalue())
    tokenizer = SentencePieceTokenizer(out_dir / SENTENCEPIECE_FILE)
    tokenizer.save(out_dir)
    return tokenizer


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
