"""Small tokenizers trained offline in a temp dir for the data-pipeline tests (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

from launcher.data.tokenizer import train_sentencepiece

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a sequence, or raise an error.",
    "A user asks a question and the assistant answers it politely.",
    "Café naïve résumé: accents survive a round trip.",
    "def add(a, b):\n    return a + b",
    "Numbers like 12345 and 678 are split into digits.",
]
# A template unlike ChatML: role headers in capitals and EOS closing each assistant turn.
HF_TEMPLATE = ("{% for m in messages %}### {{ m['role'] | upper }}:\n{{ m['content'] }}"
               "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}\n{% endfor %}")


def train_sp(directory: Path, vocab_size: int = 320) -> Path:
    """A sentencepiece BPE model whose ChatML markers are single pieces."""
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 20))
    return train_sentencepiece(corpus, directory / "sp", vocab_size, user_defined_symbols=[IM_START, IM_END])


def train_hf(directory: Path, chat_template: str | None = HF_TEMPLATE, vocab_size: int = 400) -> Path:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json naming its specials); returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<pad>", IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
              "pad_token": "<pad>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
