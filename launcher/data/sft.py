"""Supervised fine-tuning data: chat rendering with an assistant-only loss mask, and truncation.

A sample is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
It is rendered to text by a template (ChatML, or the tokenizer's own Jinja chat template),
the text is tokenized once as a whole, and a token is a training target iff its character
span overlaps the content of an assistant turn or that turn's end-of-turn marker. Tokenizing
the whole text (instead of pieces) gives exactly the ids the model sees at inference.

Truncation policy (`SFTSamples`): a sample longer than seq_length keeps its first seq_length
tokens (truncated from the right); a sample with no target token left after that is dropped,
and both are counted.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from launcher.data.indexed import IndexedDataset
from launcher.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# End-of-turn markers that tokenizer templates put right after an assistant's content; the
# marker is a target (the model must learn to stop), whatever follows it is not.
_END_OF_TURN = (IM_END, "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


class SampleError(ValueError):
    """A sample that cannot be used; preprocess reports it with its file and line."""


def check_messages(sample: Any, key: str = "messages") -> list[dict[str, str]]:
    """The conversation under `key` of an SFT sample: messages with known roles, at least one assistant's."""
    if not isinstance(sample, dict) or key not in sample:
        raise SampleError(f"missing key '{key}'")
    messages = check_message_list(sample[key], key)
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no assistant message")
    return messages


def check_message_list(messages: Any, key: str, where: str = "") -> list[dict[str, str]]:
    """A non-empty list of {"role", "content"} string messages with known roles, as plain dicts;
    `where` prefixes the message number in errors (e.g. "'chosen' ")."""
    if not isinstance(messages, list) or not messages:
        raise SampleError(f"'{key}' must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SampleError(f"{where}message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise SampleError(f"{where}message {i} has unknown role '{m['role']}' (expected one of {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chatml(messages: Sequence[dict[str, str]], first_target: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text and the [start, end) character spans that are targets (assistant content + <|im_end|>
    of the assistant messages from index `first_target` on)."""
    text, spans = "", []
    for i, m in enumerate(messages):
        text += f"{IM_START}{m['role']}\n"
        start = len(text)
        text += m["content"] + IM_END
        if m["role"] == "assistant" and i >= first_target:
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


def render_with_template(tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                         first_target: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The tokenizer's own chat template; assistant content is located in the rendered text in turn order
    (targets: the assistant messages from index `first_target` on)."""
    text = tokenizer.apply_chat_template(list(messages))  # type: ignore[attr-defined]
    ends = list(_END_OF_TURN)
    if tokenizer.eos_id is not None:
        ends.append(tokenizer.decode([tokenizer.eos_id]))
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        start = text.find(m["content"], cursor)
        if start < 0:
            raise SampleError(f"the chat template does not reproduce message {i}'s content verbatim")
        end = start + len(m["content"])
        if m["role"] == "assistant" and i >= first_target:
            marker = next((e for e in ends if e and text.startswith(e, end)), "")
            spans.append((start, end + len(marker)))
        cursor = end
    return text, spans


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                        template: str = "chatml", first_target: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, target mask uint8) of one conversation; template is "chatml" or "tokenizer".
    Assistant messages before index `first_target` are context, not targets (a preference pair's prompt)."""
    if template == "chatml":
        text, spans = render_chatml(messages, first_target)
    elif template == "tokenizer":
        text, spans = render_with_template(tokenizer, messages, first_target)
    else:
        raise ValueError(f"unknown chat template '{template}' (expected chatml or tokenizer)")
    return encode_spans(tokenizer, text, spans)


def encode_spans(tokenizer: Tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """`text` tokenized as a whole (ids int64) and its target mask (uint8): a token is a target iff
    its character span overlaps one of `spans`."""
    ids, offsets = tokenizer.encode_with_offsets(text)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=np.uint8)
    for start, end in spans:
        # Overlap, not containment: a token straddling the turn's first character still carries content.
        mask |= (off[:, 0] < end) & (off[:, 1] > start) & (off[:, 1] > off[:, 0])
    return np.asarray(ids, dtype=np.int64), mask


class SFTSamples:
    """Documents of an indexed dataset as samples of at most seq_length tokens (truncation policy above).

    Works for pretraining data too (no mask file: every token is a target). `tokens/mask` of
    sample k are document `indices[k]` cut to `lengths[k]` tokens.
    """

    def __init__(self, dataset: IndexedDataset, seq_length: int) -> None:
        self.dataset = dataset
        self.seq_length = seq_length
        full = dataset.lengths.astype(np.int64)
        cut = np.minimum(full, seq_length)
        if dataset.has_mask:
            # Targets are predicted from the previous token, so token 0 of a sample is never one.
            keep = np.array([cut[i] > 1 and bool(dataset.mask(i)[1:cut[i]].any()) for i in range(len(dataset))],
                            dtype=bool)
        else:
            keep = cut > 1
        self.indices = np.flatnonzero(keep)
        self.lengths = cut[keep]
        self.truncated = int((full[keep] > seq_length).sum())
        self.dropped = int((~keep).sum())
        if len(self.indices) == 0:
            raise ValueError(f"{dataset.prefix}: no usable sample at seq_length {seq_length} "
                             f"({self.dropped} dropped: nothing to train on after truncation)")

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        doc, n = int(self.indices[k]), int(self.lengths[k])
        return self.dataset[doc][:n].astype(np.int64), self.dataset.mask(doc)[:n]
