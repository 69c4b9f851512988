"""Token sources for real data: text / jsonl through an HF tokenizer, and pre-tokenized arrays.

Both end as one flat token stream with an end-of-document token after every document, cut into
fixed-length windows (`TokenWindows`); the loss mask drops each document's first token, so no
target is predicted from another document.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np


class DataError(ValueError):
    """Training data that cannot be used: names the file and what is wrong."""


def expand_paths(patterns: Sequence[str]) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    paths: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise DataError(f"data file {pattern!r}: no such file")
        paths += found
    if not paths:
        raise DataError("config field `data.paths` is empty: name the data files")
    return paths


def utf8_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text with universal newlines) of a UTF-8 file; a byte that is not UTF-8 is an error
    naming the file, line and column."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1})") from None
            yield number, line.replace("\r\n", "\n").replace("\r", "\n")


def read_documents(path: str, text_field: str) -> list[str]:
    """A .jsonl file gives one document per line (its `text_field`); any other file is one document."""
    if not path.endswith(".jsonl"):
        return ["".join(line for _, line in utf8_lines(path))]
    documents = []
    for where, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{where}: expected an object with a string field {text_field!r}")
        documents.append(record[text_field])
    return documents


def jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed JSON) for every non-empty line of a jsonl file; bad JSON names its line."""
    for number, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None


def load_tokenizer(path: str, vocab_size: int):
    """An HF `tokenizers` tokenizer.json (a checkpoint directory holding one works too)."""
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path!r}: no such file (config field `data.tokenizer`)")
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.get_vocab_size() > vocab_size:
        raise DataError(f"tokenizer {path}: vocabulary of {tokenizer.get_vocab_size()} tokens exceeds the "
                        f"model's vocab_size {vocab_size}")
    return tokenizer


def tokenize_text_files(paths: Sequence[str], tokenizer_path: str, text_field: str, vocab_size: int,
                        eos_id: int) -> np.ndarray:
    """Every document tokenized (no special tokens added) and followed by `eos_id`, concatenated."""
    tokenizer = load_tokenizer(tokenizer_path, vocab_size)
    pieces = []
    for path in expand_paths(paths):
        documents = read_documents(path, text_field)
        if not documents:
            raise DataError(f"data file {path}: no documents")
        for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
            pieces += [np.asarray(encoding.ids, np.int32), np.asarray([eos_id], np.int32)]
    return np.concatenate(pieces)


def open_token_file(path: str, dtype: str) -> np.ndarray:
    """A memory-mapped 1-D token array: `.npy`, or raw `dtype` values."""
    if path.endswith(".npy"):
        array = np.load(path, mmap_mode="r")
    else:
        size = os.path.getsize(path)
        if size % np.dtype(dtype).itemsize:
            raise DataError(f"token file {path}: {size} bytes is not a whole number of {dtype} tokens")
        array = np.memmap(path, dtype=dtype, mode="r")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"token file {path}: expected a 1-D integer array, found {array.dtype}{list(array.shape)}")
    return array


def check_token_range(tokens: np.ndarray, name: str, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Every token in [0, vocab_size), read in chunks (a memory map stays unread beyond one chunk), so a
    bad file fails before the first step rather than when its window comes up."""
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start:start + chunk])
        if part.size and (part.min() < 0 or part.max() >= vocab_size):
            i = int(np.argmax((part < 0) | (part >= vocab_size)))
            raise DataError(f"token file {name}: token {int(part[i])} at offset {start + i} is outside the "
                            f"model's vocabulary [0, {vocab_size})")


class TokenWindows:
    """grain random-access source: non-overlapping `seq_len` windows of token streams (one per file)."""

    def __init__(self, streams: Sequence[np.ndarray], names: Sequence[str], seq_len: int, eos_id: int,
                 vocab_size: int):
        self.streams, self.names, self.seq_len = list(streams), list(names), seq_len
        self.eos_id, self.vocab_size = eos_id, vocab_size
        counts = [len(s) // seq_len for s in self.streams]
        self.offsets = np.cumsum([0] + counts)
        if self.offsets[-1] == 0:
            raise DataError(f"data {', '.join(self.names)}: fewer than seq_len = {seq_len} tokens")
        for stream, name in zip(self.streams, self.names):
            check_token_range(stream, name, vocab_size)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        stream = int(np.searchsorted(self.offsets, index, side="right")) - 1
        start = (int(index) - int(self.offsets[stream])) * self.seq_len
        window = np.asarray(self.streams[stream][start:start + self.seq_len], np.int32)
        mask = np.ones(self.seq_len, bool)
        mask[1:] = window[:-1] != self.eos_id
        mask[0] = False
        return {"tokens": window, "mask": mask}
