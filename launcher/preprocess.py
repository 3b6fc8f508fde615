"""`python -m launcher.preprocess input=... output_prefix=... tokenizer=...` — jsonl/parquet → indexed dataset.

Reads records in file order, tokenizes them in `workers` processes (ordered imap, so the output
does not depend on the worker count), and writes `<output_prefix>.bin/.idx` (+ `.mask.bin` for
SFT and preference data) under temporary names renamed at the end. Blank lines are ignored. A
malformed record stops the run with `data error: <file>:<line>: <reason>` (exit 1) unless
skip_bad_lines=true, which skips and counts it. Empty pretraining texts are skipped and counted.
format=preference writes pairs (launcher/data/preference.py); with seq_length set, a pair whose
longer side exceeds it is an error with its file:line, or skipped and counted (skip_too_long=true).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig
from tqdm import tqdm

from launcher.cli import hydra_command
from launcher.data.indexed import IndexedDatasetWriter, token_dtype
from launcher.data.preference import Pair, check_record, encode_pair
from launcher.data.sft import SampleError, check_messages, encode_conversation
from launcher.data.tokenizer import Tokenizer, load_tokenizer

FORMATS = ("pretrain", "sft", "preference")
MASKED_FORMATS = ("sft", "preference")  # formats that write a loss mask


class DataError(Exception):
    """Bad input data: printed as one `data error: ...` line."""


@dataclass(frozen=True)
class Options:
    tokenizer: str
    format: str
    text_key: str
    messages_key: str
    chat_template: str
    append_eod: bool
    add_bos: bool
    seq_length: int | None = None  # preference: the row length every pair must fit; None = no check


@dataclass
class Summary:
    docs: int = 0
    tokens: int = 0
    target_tokens: int = 0
    bad_lines: int = 0
    empty: int = 0
    pairs: int = 0
    rejected_target_tokens: int = 0  # preference: target tokens of the rejected sides (target_tokens: chosen)
    too_long: int = 0  # preference pairs skipped for not fitting seq_length
    lengths: Counter = field(default_factory=Counter)  # power-of-two bucket → documents

    def add(self, n: int, targets: int, *, new_document: bool = True) -> None:
        self.docs += new_document
        self.tokens += n
        self.target_tokens += targets
        self.lengths[max(n, 1).bit_length() - 1] += 1  # bucket k holds lengths in [2^k, 2^(k+1))

    def add_pair(self, pair: Pair) -> None:
        self.pairs += 1
        self.add(len(pair.chosen_ids), int(pair.chosen_mask.sum()))
        self.add(len(pair.rejected_ids), 0, new_document=False)  # a pair is one document of two sequences
        self.rejected_target_tokens += int(pair.rejected_mask.sum())

    def lines(self, fmt: str) -> list[str]:
        if fmt == "preference":
            out = [f"pairs: {self.pairs}", f"tokens: {self.tokens}",
                   f"target tokens: chosen {self.target_tokens}, rejected {self.rejected_target_tokens}",
                   f"skipped bad lines: {self.bad_lines}", f"skipped pairs longer than seq_length: {self.too_long}",
                   "sequence length histogram (tokens, both sides):"]
        else:
            out = [f"documents: {self.docs}", f"tokens: {self.tokens}"]
            if fmt == "sft":
                out.append(f"target (assistant) tokens: {self.target_tokens}")
            out += [f"skipped bad lines: {self.bad_lines}", f"skipped empty texts: {self.empty}",
                    "document length histogram (tokens):"]
        width = max((self.lengths[k] for k in self.lengths), default=1)
        for k in sorted(self.lengths):
            bar = "#" * max(1, round(40 * self.lengths[k] / width))
            out.append(f"  [{2**k:>7}, {2**(k + 1):>7}): {self.lengths[k]:>9} {bar}")
        return out


_state: tuple[Tokenizer, Options] | None = None  # per worker process


def _init_worker(options: Options) -> None:
    global _state
    _state = (load_tokenizer(options.tokenizer), options)


def _encode(payload: bytes | dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None] | Pair | None:
    """One record → (ids, mask or None), or a Pair for preference data; None for an empty pretraining
    text. Raises SampleError."""
    assert _state is not None
    tok, opt = _state
    if isinstance(payload, bytes):
        try:
            record = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise SampleError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise SampleError(f"invalid JSON: {err.msg} (column {err.colno})") from None
    else:
        record = payload
    if not isinstance(record, dict):
        raise SampleError(f"expected a JSON object, got {type(record).__name__}")
    if opt.format == "preference":
        return encode_pair(tok, check_record(record, opt.messages_key), template=opt.chat_template,
                           append_eod=opt.append_eod, add_bos=opt.add_bos)
    bos = [tok.bos_id] if opt.add_bos else []
    if opt.format == "sft":
        ids, mask = encode_conversation(tok, check_messages(record, opt.messages_key), opt.chat_template)
        return np.concatenate([np.asarray(bos, np.int64), ids]), np.concatenate([np.zeros(len(bos), np.uint8), mask])
    text = record.get(opt.text_key)
    if not isinstance(text, str):
        raise SampleError(f"missing key '{opt.text_key}'" if opt.text_key not in record else
                          f"'{opt.text_key}' must be a string, got {type(text).__name__}")
    if not text:
        return None
    eod = [tok.eos_id] if opt.append_eod else []
    return np.asarray(bos + tok.encode(text) + eod, dtype=np.int64), None


def _encode_chunk(chunk: list[tuple[int, int, Any]]) -> list[tuple[int, int, Any]]:
    results = []
    for file_index, line, payload in chunk:
        try:
            results.append((file_index, line, _encode(payload)))
        except SampleError as err:
            results.append((file_index, line, err))
    return results


def _records(paths: list[Path]) -> Iterator[tuple[int, int, Any]]:
    for file_index, path in enumerate(paths):
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow, which is not installed "
                                f"(pip install pyarrow)") from None
            row = 0
            for batch in pq.ParquetFile(path).iter_batches():
                for record in batch.to_pylist():
                    row += 1
                    yield file_index, row, record
        else:
            with open(path, "rb") as f:
                for line, raw in enumerate(f, start=1):
                    if raw.strip():
                        yield file_index, line, raw.rstrip(b"\r\n")


def _chunks(records: Iterator[tuple[int, int, Any]], size: int) -> Iterator[list[tuple[int, int, Any]]]:
    chunk = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def preprocess(inputs: list[str | Path], output_prefix: str | Path, options: Options, *, workers: int = 1,
               chunk_size: int = 256, skip_bad_lines: bool = False, skip_too_long: bool = False) -> Summary:
    """Tokenize `inputs` into the indexed dataset `output_prefix`; raises DataError on bad data.
    `skip_too_long` (preference, with options.seq_length): skip and count pairs that do not fit."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("input: no input files given")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
        if p.suffix not in (".jsonl", ".json", ".parquet"):
            raise DataError(f"{p}: unsupported input type '{p.suffix}' (expected .jsonl or .parquet)")
    if options.format not in FORMATS:
        raise ValueError(f"format: '{options.format}' is not one of {', '.join(FORMATS)}")
    masked = options.format in MASKED_FORMATS
    if masked and options.chat_template not in ("chatml", "tokenizer"):
        raise ValueError(f"chat_template: '{options.chat_template}' is not one of chatml, tokenizer")
    if options.seq_length is not None and (options.format != "preference" or options.seq_length < 1):
        raise ValueError(f"seq_length: {options.seq_length} must be null, or a positive integer with format=preference")
    tokenizer = load_tokenizer(options.tokenizer)
    if masked and options.chat_template == "tokenizer" and tokenizer.chat_template is None:
        raise ValueError(f"chat_template: tokenizer {tokenizer.path} has no chat template; use chat_template=chatml")
    if options.format != "sft" and options.append_eod and tokenizer.eos_id is None:
        raise ValueError(f"append_eod: tokenizer {tokenizer.path} has no EOS token; set append_eod=false")
    if options.add_bos and tokenizer.bos_id is None:
        raise ValueError(f"add_bos: tokenizer {tokenizer.path} has no BOS token")

    summary = Summary()
    chunks = _chunks(_records(paths), chunk_size)
    pool = None
    if workers > 1:
        # spawn: the tokenizer libraries' thread pools do not survive fork reliably.
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(options,))
        results = pool.imap(_encode_chunk, chunks)  # ordered: output independent of scheduling
    else:
        _init_worker(options)
        results = map(_encode_chunk, chunks)
    try:
        with IndexedDatasetWriter(output_prefix, token_dtype(tokenizer.vocab_size), with_mask=masked,
                                  sequences_per_document=2 if options.format == "preference" else 1) as writer, \
                tqdm(unit=" docs", desc="preprocess", disable=None, file=sys.stderr) as bar:
            for chunk in results:
                for file_index, line, result in chunk:
                    if isinstance(result, SampleError):
                        if not skip_bad_lines:
                            raise DataError(f"{paths[file_index]}:{line}: {result}")
                        summary.bad_lines += 1
                    elif result is None:
                        summary.empty += 1
                    elif isinstance(result, Pair):
                        if options.seq_length is not None and result.longest > options.seq_length:
                            if not skip_too_long:
                                raise DataError(f"{paths[file_index]}:{line}: the pair does not fit seq_length "
                                                f"{options.seq_length} (chosen {len(result.chosen_ids)}, rejected "
                                                f"{len(result.rejected_ids)} tokens; skip_too_long=true skips it)")
                            summary.too_long += 1
                            continue
                        writer.add(result.chosen_ids, result.chosen_mask)
                        writer.add(result.rejected_ids, result.rejected_mask)
                        summary.add_pair(result)
                    else:
                        ids, mask = result
                        writer.add(ids, mask)
                        summary.add(len(ids), int(mask.sum()) if mask is not None else len(ids))
                bar.update(len(chunk))
            if summary.docs == 0:
                skipped = [f"{n} {what} skipped" for n, what in ((summary.bad_lines, "bad lines"),
                                                                 (summary.too_long, "pairs too long")) if n]
                raise DataError(f"{', '.join(map(str, paths))}: no documents (empty dataset"
                                f"{''.join(', ' + s for s in skipped)})")
            writer.finalize()
    finally:
        if pool is not None:
            pool.terminate()
    return summary


@hydra_command("preprocess")
def main(cfg: DictConfig) -> None:
    inputs = list(cfg.input) if isinstance(cfg.input, ListConfig) else [cfg.input]
    options = Options(tokenizer=str(cfg.tokenizer), format=cfg.format, text_key=cfg.text_key,
                      messages_key=cfg.messages_key, chat_template=cfg.chat_template,
                      append_eod=bool(cfg.append_eod), add_bos=bool(cfg.add_bos),
                      seq_length=None if cfg.seq_length is None else int(cfg.seq_length))
    try:
        summary = preprocess(inputs, cfg.output_prefix, options, workers=int(cfg.workers),
                             chunk_size=int(cfg.chunk_size), skip_bad_lines=bool(cfg.skip_bad_lines),
                             skip_too_long=bool(cfg.skip_too_long))
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as err:  # configuration: bad key value, missing tokenizer
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {cfg.output_prefix}.bin/.idx" + ("/.mask.bin" if options.format in MASKED_FORMATS else ""))
    print("\n".join(summary.lines(options.format)))


if __name__ == "__main__":  # spawn workers re-import this module: keep the guard
    main()
