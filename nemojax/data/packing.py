"""Whole documents packed into `seq_len` windows, with the segment ids that keep them apart in the model.

A unit is a group of documents that must share a window (an SFT conversation: one; a DPO pair: chosen,
then rejected, so a pair's documents are segments 2k and 2k + 1). Units fill windows greedily in the
order given; the rest of a window is padding (token `pad_id`, no loss, a segment of its own). A
document's first token is never a target: nothing before it in the window belongs to it.
Overlong units follow a stated rule and are counted: "truncate" keeps a single document's first
`seq_len` tokens (dropped if no target is left), "drop" drops it; a pair longer than a window is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from nemojax.data.sources import DataError

Document = tuple[np.ndarray, np.ndarray]  # (token ids, target mask)


@dataclasses.dataclass
class PackStats:
    seq_len: int
    units: int = 0  # kept
    windows: int = 0
    truncated: int = 0
    dropped: int = 0
    real_tokens: int = 0

    def describe(self, what: str) -> str:
        fill = self.real_tokens / max(1, self.windows * self.seq_len)
        return (f"{self.units} {what} packed into {self.windows} windows ({fill:.0%} filled); "
                f"{self.truncated} truncated and {self.dropped} dropped for being longer than seq_len")


def _fit(unit: Sequence[Document], seq_len: int, overlong: str, stats: PackStats) -> list[Document] | None:
    if sum(len(ids) for ids, _ in unit) <= seq_len:
        return list(unit)
    if overlong == "truncate" and len(unit) == 1 and unit[0][1][:seq_len].any():
        stats.truncated += 1
        return [(unit[0][0][:seq_len], unit[0][1][:seq_len])]
    stats.dropped += 1
    return None


def pack(units: Sequence[Sequence[Document]], seq_len: int, pad_id: int, overlong: str = "truncate"
         ) -> tuple[dict[str, np.ndarray], PackStats]:
    """{"tokens", "mask", "segment_ids"}: [windows, seq_len] arrays, and what packing did."""
    if overlong not in ("truncate", "drop"):
        raise DataError(f"config field `data.overlong` = {overlong!r}: expected 'truncate' or 'drop'")
    stats = PackStats(seq_len)
    windows: list[list[Document]] = []
    used = seq_len  # the open window's tokens; full at the start
    for unit in units:
        fitted = _fit(unit, seq_len, overlong, stats)
        if fitted is None:
            continue
        size = sum(len(ids) for ids, _ in fitted)
        if used + size > seq_len:
            windows.append([])
            used = 0
        windows[-1] += fitted
        used += size
        stats.units += 1
        stats.real_tokens += size
    if not windows:
        raise DataError(f"no example fits in seq_len = {seq_len} tokens ({stats.dropped} dropped)")
    tokens = np.full((len(windows), seq_len), pad_id, np.int32)
    mask = np.zeros((len(windows), seq_len), bool)
    segments = np.zeros((len(windows), seq_len), np.int32)
    for row, documents in enumerate(windows):
        at = 0
        for segment, (ids, target) in enumerate(documents):
            tokens[row, at:at + len(ids)], mask[row, at + 1:at + len(ids)] = ids, target[1:]
            segments[row, at:at + len(ids)] = segment
            at += len(ids)
        segments[row, at:] = len(documents)
    stats.windows = len(windows)
    return {"tokens": tokens, "mask": mask, "segment_ids": segments}, stats


class PackedWindows:
    """grain random-access source over packed windows (and any per-window arrays added beside them)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["tokens"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[int(index)] for k, v in self.arrays.items()}
