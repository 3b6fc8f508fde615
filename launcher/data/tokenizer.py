"""SentencePiece tokenizer: training on a corpus file and a small typed wrapper for encode/decode."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Enough lines to learn a few thousand merges; the bound keeps training well under a minute
# on 2 cores whatever the corpus size.
_MAX_TRAINING_SENTENCES = 200_000


class SentencePieceTokenizer:
    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        """Encode many documents at once; sentencepiece spreads the work over threads."""
        return self._sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def train_sentencepiece(corpus_path: Path, model_prefix: Path, vocab_size: int) -> Path:
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
    )
    return Path(f"{model_prefix}.model")
