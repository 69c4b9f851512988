"""Padding and document starts shared by both SSD drivers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad(t: jax.Array, length: int, width: int | None = None) -> jax.Array:
    """Time (axis 1) to `length`, the last axis to `width`. Padded steps have dt = 0 and x = 0: no decay
    and no input, so they change neither outputs nor states."""
    pads = [(0, 0), (0, length - t.shape[1])] + [(0, 0)] * (t.ndim - 2)
    if width is not None:
        pads[-1] = (0, width - t.shape[-1])
    return jnp.pad(t, pads)



# Packed documents: the log-decay of each document's first step is lowered by this much, so e^-32 (about
# 1e-14) of the state before it carries over: the recurrence restarts. Everything the kernels compute is
# then as without documents (a decay e^{s_i - s_j} across a start is ~0, e^{s_end} of a chunk with a start
# is ~0), forward and backward; the cost is the rounding of s at a larger magnitude (|s| grows by 32 per
# start in a chunk, where strong natural decays reach such magnitudes anyway).
DOCUMENT_RESET = 32.0


def document_starts(segment_ids: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """[b, l] fp32: 1.0 where a new document starts (its id differs from the previous position's)."""
    if segment_ids is None:
        return jnp.zeros(shape, jnp.float32)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(changed, [(0, 0), (1, 0)]).astype(jnp.float32)
