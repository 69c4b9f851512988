"""Scanning over repeated groups of blocks, so compile time does not grow with depth.

A released pattern such as Nemotron-H-8B's `M-M-M-M*-M-M-M-M-M*-...` repeats a few short periods.
`layer_runs` covers a pattern with runs: a period repeated k >= 2 times becomes one `lax.scan` (its
blocks compiled once, their parameters stacked on a leading "layers" axis), anything else stays an
unrolled block. With `ModelConfig.scan_layers` the model's parameter tree holds each scanned run under
`scan_{start}/block_{j}` (block j of the period, stacked over its repeats) instead of `layers_{i}`.

Checkpoints keep working in both layouts: the HF name table and the converter speak the per-layer
layout (`layers_{i}`), and `stack_layers` / `unstack_layers` move a tree between the two.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_PERIOD = 16  # longest period searched for; released periods are 2-11 blocks


@dataclasses.dataclass(frozen=True)
class LayerRun:
    """Layers start .. stop-1: `period` (block kinds) repeated `repeats` times."""

    start: int
    period: str
    repeats: int

    @property
    def stop(self) -> int:
        return self.start + len(self.period) * self.repeats

    @property
    def scanned(self) -> bool:
        return self.repeats > 1

    @property
    def key(self) -> str:
        """Its top-level key in the parameter tree."""
        return f"scan_{self.start}" if self.scanned else f"layers_{self.start}"

    def layer(self, repeat: int, block: int) -> int:
        return self.start + repeat * len(self.period) + block


@functools.lru_cache(maxsize=64)
def layer_runs(pattern: str, scan: bool = True) -> tuple[LayerRun, ...]:
    """The runs that minimise the blocks the compiler sees (a scanned run costs its period's length, a
    lone block 1; ties go to fewer runs). Without `scan`, every block is its own run."""
    n = len(pattern)
    if not scan:
        return tuple(LayerRun(i, kind, 1) for i, kind in enumerate(pattern))
    best: list[tuple[int, int]] = [(0, 0)] + [(n + 1, n + 1)] * n  # (blocks compiled, runs) covering pattern[:i]
    last: list[LayerRun | None] = [None] * (n + 1)

    def relax(run: LayerRun, cost: int) -> None:
        candidate = (best[run.start][0] + cost, best[run.start][1] + 1)
        if candidate < best[run.stop]:
            best[run.stop], last[run.stop] = candidate, run

    for i in range(n):
        relax(LayerRun(i, pattern[i], 1), 1)
        for m in range(1, min(MAX_PERIOD, (n - i) // 2) + 1):
            period, k = pattern[i:i + m], 1
            while pattern[i + k * m:i + (k + 1) * m] == period:
                k += 1
                relax(LayerRun(i, period, k), m)
    runs, i = [], n
    while i:
        runs.append(last[i])
        i = last[i].start
    return tuple(reversed(runs))


def _stack(leaves: list[Any]) -> Any:
    return np.stack(leaves) if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack(leaves)


def stack_layers(tree: dict, pattern: str) -> dict:
    """Per-layer tree (`layers_{i}`) -> the scanned layout of `layer_runs(pattern)`; other keys unchanged."""
    out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    for run in layer_runs(pattern):
        if not run.scanned:
            out[run.key] = tree[run.key]
            continue
        out[run.key] = {f"block_{j}": jax.tree.map(lambda *xs: _stack(list(xs)),
                                                   *[tree[f"layers_{run.layer(r, j)}"] for r in range(run.repeats)])
                        for j in range(len(run.period))}
    return out


def unstack_layers(tree: dict, pattern: str) -> dict:
    """The scanned layout -> per-layer; a per-layer tree comes back unchanged."""
    out = {k: v for k, v in tree.items() if not k.startswith("scan_")}
    for run in layer_runs(pattern):
        if not run.scanned or run.key not in tree:
            continue
        for j in range(len(run.period)):
            block = tree[run.key][f"block_{j}"]
            for r in range(run.repeats):
                out[f"layers_{run.layer(r, j)}"] = jax.tree.map(lambda x: x[r], block)
    return out


def is_stacked(tree: dict) -> bool:
    return any(key.startswith("scan_") for key in tree)


def to_layout(tree: dict, pattern: str, scanned: bool) -> dict:
    """`tree` in the scanned (True) or per-layer (False) layout, whichever it is in now."""
    if is_stacked(tree) == scanned or not any(r.scanned for r in layer_runs(pattern)):
        return tree
    return stack_layers(tree, pattern) if scanned else unstack_layers(tree, pattern)


def layer_name(key: str, repeat: int, pattern: str) -> str:
    """`layers_{i}` for entry `repeat` of a stacked value at `key` ("scan_{start}/block_{j}/...")."""
    parts = key.split("/")
    run = next(r for r in layer_runs(pattern) if r.key == parts[0])
    return f"layers_{run.layer(repeat, int(parts[1].removeprefix('block_')))}"
