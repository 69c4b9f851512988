"""A synthetic byte-level language the default run learns on the CPU in minutes.

Each document is one line, of one of two kinds:
- associative recall: `a=7 q=3 m=9 | q=3 a=7` -- key=value pairs, then queries of earlier keys whose
  values must be recalled (a state-space layer alone recalls poorly; attention does it exactly);
- arithmetic: `37+48=85`.
The "recall" positions (the queried values' digits) let training and eval report recall accuracy.
"""

from __future__ import annotations

import string

import numpy as np

NEWLINE = ord("\n")  # the end-of-document token (byte 10)
HELD_OUT_STREAM = 1_000_003  # added to a run's seed: held-out examples come from a stream no run trains on
VOCAB_SIZE = 256
_LETTERS = np.frombuffer(string.ascii_lowercase.encode(), np.uint8)


def recall_document(rng: np.random.Generator) -> tuple[bytes, list[int]]:
    """One recall line and the byte offsets of the digits that must be recalled."""
    n_pairs = int(rng.integers(2, 7))
    keys = [bytes([k]) for k in rng.choice(_LETTERS, n_pairs, replace=False)]
    values = [b"%d" % v for v in rng.integers(0, 10, n_pairs)]
    text = b" ".join(k + b"=" + v for k, v in zip(keys, values)) + b" |"
    answers = []
    for i in rng.permutation(n_pairs):  # every key is queried once
        text += b" " + keys[i] + b"="
        answers.append(len(text))
        text += values[i]
    return text + b"\n", answers


def arithmetic_document(rng: np.random.Generator) -> tuple[bytes, list[int]]:
    a, b = rng.integers(0, 100, 2)
    return b"%d+%d=%d\n" % (a, b, a + b), []


def synthetic_example(seed: int, index: int, seq_len: int) -> dict[str, np.ndarray]:
    """Sequence `index` of the stream `seed`: whole documents packed into `seq_len` bytes.

    tokens: int32 bytes; mask: whether tokens[t] is a target (not a document's first token);
    recall: whether tokens[t] is a recalled digit.
    """
    rng = np.random.default_rng((seed, index))
    tokens, starts, recall = bytearray(), [], []
    while len(tokens) < seq_len:
        text, answers = (recall_document if rng.random() < 0.7 else arithmetic_document)(rng)
        starts.append(len(tokens))
        recall += [len(tokens) + a for a in answers]
        tokens += text
    mask = np.ones(seq_len, bool)
    mask[[s for s in starts if s < seq_len]] = False
    is_recall = np.zeros(len(tokens), bool)
    is_recall[recall] = True
    return {"tokens": np.frombuffer(bytes(tokens[:seq_len]), np.uint8).astype(np.int32), "mask": mask,
            "recall": is_recall[:seq_len]}


class SyntheticSource:
    """grain random-access source of `synthetic_example`s (as many as a run can ask for)."""

    def __init__(self, seed: int, seq_len: int, length: int = 2**31 - 1):
        self.seed, self.seq_len, self.length = seed, seq_len, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return synthetic_example(self.seed, int(index), self.seq_len)
