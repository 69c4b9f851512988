"""Padding shared by both SSD drivers."""

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

