"""Tokenizers behind one interface: sentencepiece `.model` files and Hugging Face `tokenizer.json`.

`load_tokenizer(path)` picks the implementation from the path: a `.model` file is sentencepiece, a
`tokenizer.json` file (or a directory holding one, e.g. an HF model dir) goes through the
`tokenizers` library. Special ids are explicit and may be None where a tokenizer defines none;
`fill_id` says what pads a row then (the value never matters: padding is always loss-masked).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SENTENCEPIECE_FILE = "tokenizer.model"  # a sentencepiece model's name inside a directory (HF's name for it)
# What an HF tokenizer directory holds besides tokenizer.json that changes how it is used: the
# special tokens and the chat template.
HF_TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
# Enough lines to learn a few thousand merges; the bound keeps training well under a minute
# on 2 cores whatever the corpus size.
_MAX_TRAINING_SENTENCES = 200_000


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer. encode never adds BOS/EOS: callers add them."""

    path: Path
    chat_template: str | None  # the tokenizer's own Jinja chat template, if it ships one

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int | None: ...
    @property
    def pad_id(self) -> int | None: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def id_to_token(self, i: int) -> str: ...
    def include_in_checkpoints(self) -> dict[str, Path]:
        """The files that rebuild this tokenizer (name in a directory -> where it is now):
        `load_tokenizer(<that directory>)` gives the same tokenizer back."""
        ...


class SentencePieceTokenizer:
    chat_template: str | None = None

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = self.path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    # sentencepiece reports a disabled special id as -1; the interface says None.
    @property
    def bos_id(self) -> int | None:
        return _none_if_negative(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _none_if_negative(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return _none_if_negative(self._sp.pad_id())

    @property
    def unk_id(self) -> int | None:
        return _none_if_negative(self._sp.unk_id())

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        """Encode many documents at once; sentencepiece spreads the work over threads."""
        return self._sp.encode(texts, out_type=int, num_threads=num_threads)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the [start, end) character span of text each id covers (empty for the dummy prefix)."""
        proto = self._sp.encode(text, out_type="proto")
        # sentencepiece reports UTF-8 byte offsets; map them to character offsets.
        char_at = [0] * (len(text.encode("utf-8")) + 1)
        pos = 0
        for i, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            for b in range(pos, pos + n):
                char_at[b] = i
            pos += n
        char_at[pos] = len(text)
        return [p.id for p in proto.pieces], [(char_at[p.begin], char_at[p.end]) for p in proto.pieces]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def include_in_checkpoints(self) -> dict[str, Path]:
        return {SENTENCEPIECE_FILE: self.path}


def _none_if_negative(i: int) -> int | None:
    return i if i >= 0 else None


# Names tokenizer.json files commonly give their special tokens, used only when no
# tokenizer_config.json says which is which.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`) through the `tokenizers` library.

    Special ids come from a sibling tokenizer_config.json (bos_token/eos_token/pad_token) when
    there is one, else from well-known token names; None when neither names one. The chat
    template, when the config has one, is rendered through transformers' apply_chat_template.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer  # a dependency of transformers

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {file}")
        self.path = file
        self._tok = _Tokenizer.from_file(str(file))
        config_file = file.parent / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.chat_template: str | None = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        self._bos = self._special(config, "bos_token", _BOS_NAMES)
        self._eos = self._special(config, "eos_token", _EOS_NAMES)
        self._pad = self._special(config, "pad_token", _PAD_NAMES)
        self._hf = None  # transformers tokenizer, loaded only to render the chat template

    def _special(self, config: dict, key: str, names: tuple[str, ...]) -> int | None:
        if key in config:  # an explicit null in the config means "none", not "guess"
            token = config[key]
            if isinstance(token, dict):  # older configs store AddedToken dicts
                token = token.get("content")
            return None if token is None else self._tok.token_to_id(token)
        for name in names:
            if (i := self._tok.token_to_id(name)) is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def include_in_checkpoints(self) -> dict[str, Path]:
        files = {"tokenizer.json": self.path}
        files.update({name: self.path.parent / name for name in HF_TOKENIZER_EXTRAS
                      if (self.path.parent / name).is_file()})
        return files

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The conversation rendered by the tokenizer's own template (no generation prompt)."""
        if self.chat_template is None:
            raise ValueError(f"{self.path} has no chat_template (tokenizer_config.json)")
        if self._hf is None:
            from transformers import AutoTokenizer
            self._hf = AutoTokenizer.from_pretrained(str(self.path.parent))
        return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `.model` file → sentencepiece; `tokenizer.json` or a directory holding one → Hugging Face;
    a directory holding only a tokenizer.model (a checkpoint's tokenizer/) → sentencepiece."""
    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.json").is_file() and (path / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer(path / SENTENCEPIECE_FILE)
    if path.is_dir() or path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model" or path.is_file():
        return SentencePieceTokenizer(path)
    raise FileNotFoundError(f"tokenizer not found: {path} (expected a sentencepiece .model, a tokenizer.json "
                            f"or a directory holding tokenizer.json)")


def fill_id(tokenizer: Tokenizer) -> int:
    """The id that pads rows: pad, else EOS, else 0. Padding is loss-masked, so only validity matters."""
    for i in (tokenizer.pad_id, tokenizer.eos_id):
        if i is not None:
            return i
    return 0


def check_vocab_size(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The model's (possibly padded) embedding must hold every id the tokenizer can produce."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer/vocab mismatch: tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens "
                         f"but model.vocab_size is {model_vocab_size}")


def train_sentencepiece(corpus_path: Path, model_prefix: Path, vocab_size: int,
                        user_defined_symbols: Sequence[str] = ()) -> Path:
    """Train a Llama-style BPE model on corpus_path (one sentence per line); returns `<model_prefix>.model`."""
    spm.set_random_generator_seed(0)  # the sentence shuffle/sampling is the only randomness: fix it
    spm.SentencePieceTrainer.train(
        input=str(corpus_path),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        byte_fallback=True,  # any byte (emoji, box drawing, "\n") stays encodable, never <unk>
        # Exact round trip: no NFKC, and keep code indentation / runs of spaces.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=_MAX_TRAINING_SENTENCES,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,  # errors only; training otherwise prints thousands of lines
        # Pieces always kept whole, e.g. ChatML's <|im_start|>/<|im_end|> markers.
        user_defined_symbols=list(user_defined_symbols),
    )
    return Path(f"{model_prefix}.model")
