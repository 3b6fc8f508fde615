"""Preference data: a prompt with a chosen and a rejected response, rendered, masked and read back as pairs.

Record shapes (TRL's conventions for the first two):
  standard        {"prompt": str, "chosen": str, "rejected": str}: plain text, no chat template; each
                  response is appended to the prompt and followed by EOS (preprocess append_eod)
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}: prompt +
                  response rendered by the chat template (as SFT, launcher/data/sft.py)
  messages        {"messages": [..., assistant], "rejected_response": str | message | [messages]}:
                  the last (assistant) message is the chosen response, rejected_response replaces it
A response is assistant messages only; everything before it is the prompt.

Each side is tokenized as a whole. Its targets are the response: the tokens that overlap the
response text (and its EOS) in the standard shape, the assistant content and end-of-turn marker
of the response's messages otherwise. The prompt is never a target, including assistant turns
inside it.

On disk a preference dataset is one indexed dataset (launcher/data/indexed.py) with a mask file,
whose index groups the sequences two by two into documents: sequence 2k is pair k's chosen side,
2k + 1 its rejected side. A pair thus stays whole through any document-level split or shuffle,
and one read gives both sides to whatever batches them.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from launcher.data.indexed import IndexedDataset
from launcher.data.sft import SampleError, check_message_list, encode_conversation, encode_spans
from launcher.data.tokenizer import Tokenizer

PAIR_FIELDS = ("prompt", "chosen", "rejected")
REJECTED_RESPONSE = "rejected_response"  # the messages shape's rejected side


@dataclass(frozen=True)
class PreferenceRecord:
    """A validated record: plain text (all three strings) or messages (all three message lists)."""
    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class Pair:
    """Token ids (int64) and target masks (uint8, 1 = train to predict this token) of both sides."""
    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray

    @property
    def longest(self) -> int:
        """Tokens of the longer side: the pair fits rows of seq_length iff this does."""
        return max(len(self.chosen_ids), len(self.rejected_ids))


def check_record(record: Any, messages_key: str = "messages") -> PreferenceRecord:
    """The record as a PreferenceRecord; SampleError (one line) for a missing field, a wrong type or an
    empty response."""
    if not isinstance(record, dict):
        raise SampleError(f"expected a JSON object, got {type(record).__name__}")
    if messages_key in record:
        return _from_messages(record, messages_key)
    for key in PAIR_FIELDS:
        if key not in record:
            raise SampleError(f"missing field '{key}' (a pair is {{'prompt', 'chosen', 'rejected'}} or "
                              f"{{'{messages_key}', '{REJECTED_RESPONSE}'}})")
    values = [record[key] for key in PAIR_FIELDS]
    if all(isinstance(v, str) for v in values):
        for key in ("chosen", "rejected"):
            if not record[key].strip():
                raise SampleError(f"empty response '{key}'")
        return PreferenceRecord(*values)
    if not all(isinstance(v, list) for v in values):
        raise SampleError("'prompt', 'chosen' and 'rejected' must all be strings (plain text) or all be "
                          "message lists")
    prompt = check_message_list(record["prompt"], "prompt", "'prompt' ")
    return PreferenceRecord(prompt, _response(record["chosen"], "chosen"), _response(record["rejected"], "rejected"))


def _from_messages(record: dict[str, Any], key: str) -> PreferenceRecord:
    messages = check_message_list(record[key], key, f"'{key}' ")
    if REJECTED_RESPONSE not in record:
        raise SampleError(f"missing field '{REJECTED_RESPONSE}'")
    if messages[-1]["role"] != "assistant":
        raise SampleError(f"the last message of '{key}' must be the assistant's (the chosen response)")
    if len(messages) < 2:
        raise SampleError(f"'{key}' has no prompt before the chosen response")
    rejected = record[REJECTED_RESPONSE]
    if isinstance(rejected, str):
        rejected = [{"role": "assistant", "content": rejected}]
    elif isinstance(rejected, dict):
        rejected = [rejected]
    return PreferenceRecord(messages[:-1], _response(messages[-1:], "chosen"),
                            _response(rejected, REJECTED_RESPONSE))


def _response(messages: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise SampleError(f"'{key}' must be a string or a list of messages, got {type(messages).__name__}")
    messages = check_message_list(messages, key, f"'{key}' ")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise SampleError(f"'{key}' message {i} is a {m['role']} message: a response is assistant messages only")
    if not any(m["content"].strip() for m in messages):
        raise SampleError(f"empty response '{key}'")
    return messages


def encode_pair(tokenizer: Tokenizer, record: PreferenceRecord, *, template: str = "chatml",
                append_eod: bool = True, add_bos: bool = False) -> Pair:
    """Both sides of `record` tokenized and masked (rules in the module docstring). `template` renders
    message records (chatml | tokenizer); `append_eod` ends plain-text responses with EOS; `add_bos`
    starts both sides with BOS (never a target)."""
    sides = []
    for response in (record.chosen, record.rejected):
        if record.conversational:
            messages = [*record.prompt, *response]  # type: ignore[misc]
            ids, mask = encode_conversation(tokenizer, messages, template, first_target=len(record.prompt))
        else:
            text = record.prompt + response  # type: ignore[operator]
            ids, mask = encode_spans(tokenizer, text, [(len(record.prompt), len(text))])
            if append_eod:
                ids, mask = np.append(ids, tokenizer.eos_id), np.append(mask, np.uint8(1))
        if add_bos:
            ids, mask = np.insert(ids, 0, tokenizer.bos_id), np.insert(mask, 0, np.uint8(0))
        sides += [ids.astype(np.int64), mask.astype(np.uint8)]
    return Pair(*sides)


class PreferencePairs:
    """The pairs of a preference dataset (`launcher.preprocess format=preference`), optionally only
    those that fit rows of `seq_length` tokens (`dropped` counts the others).

    A pair is usable when each side fits seq_length whole (`packed`: both sides together, as packed
    rows keep a pair in one row) and has a target token after its first (a target is predicted from
    the token before it). `pair(k)` is the k-th usable pair; `documents` limits them to those pair
    indices (a part of data.split: a pair is one document).
    """

    def __init__(self, dataset: IndexedDataset, seq_length: int | None = None, packed: bool = False,
                 documents: range | None = None) -> None:
        n = len(dataset)
        if not dataset.has_mask or n % 2 or not np.array_equal(dataset.document_indices,
                                                               np.arange(0, n + 1, 2)):
            raise ValueError(f"{dataset.prefix} is not a preference dataset (pairs of masked sequences: "
                             f"python -m launcher.preprocess format=preference)")
        self.dataset = dataset
        self.seq_length = seq_length
        self.documents = documents
        lengths = dataset.lengths.astype(np.int64).reshape(-1, 2)
        inside = np.zeros(len(lengths), dtype=bool)
        inside[documents if documents is not None else slice(None)] = True
        keep = inside.copy()
        if seq_length is not None:
            keep &= (lengths.sum(axis=1) if packed else lengths.max(axis=1)) <= seq_length
        for k in np.flatnonzero(keep):
            keep[k] = all(bool(dataset.mask(int(i))[1:].any()) for i in (2 * k, 2 * k + 1))
        self.indices = np.flatnonzero(keep)
        self.lengths = lengths[keep]  # [pairs, 2]: chosen, rejected
        self.dropped = int((inside & ~keep).sum())
        if len(self.indices) == 0:
            raise ValueError(f"{dataset.prefix}: no usable pair" + (f" at seq_length {seq_length}" if seq_length else "")
                             + f" ({self.dropped} dropped)")

    def __len__(self) -> int:
        return len(self.indices)

    def chosen_targets(self) -> np.ndarray:
        """Target tokens of each usable pair's chosen side (a target is predicted from the token before it)."""
        return np.array([int(self.dataset.mask(2 * int(d))[1:].sum()) for d in self.indices], dtype=np.int64)

    def sources(self) -> list[tuple[str, range | None]]:
        """(dataset prefix, its part of the pairs) of these pairs."""
        return [(str(self.dataset.prefix), self.documents)]

    def pair(self, k: int) -> Pair:
        doc = int(self.indices[k])
        c, r = 2 * doc, 2 * doc + 1
        return Pair(self.dataset[c].astype(np.int64), self.dataset.mask(c), self.dataset[r].astype(np.int64),
                    self.dataset.mask(r))

    def __iter__(self) -> Iterator[Pair]:
        return (self.pair(k) for k in range(len(self)))


class ConcatenatedPairs:
    """The usable pairs of several preference datasets, one dataset after the other: pair k of the whole is
    the first dataset's pair k, past its end the second's, and so on (PreferencePairs' interface)."""

    def __init__(self, parts: list[PreferencePairs]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.lengths = np.concatenate([p.lengths for p in parts])  # [pairs, 2]: chosen, rejected
        self.dropped = sum(p.dropped for p in parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def chosen_targets(self) -> np.ndarray:
        return np.concatenate([p.chosen_targets() for p in self.parts])

    def sources(self) -> list[tuple[str, range | None]]:
        return [source for p in self.parts for source in p.sources()]

    def pair(self, k: int) -> Pair:
        part = int(np.searchsorted(self.offsets, k, side="right")) - 1
        return self.parts[part].pair(k - int(self.offsets[part]))

    def __iter__(self) -> Iterator[Pair]:
        return (self.pair(k) for k in range(len(self)))
