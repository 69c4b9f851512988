"""Depthwise causal 1-D convolution with a hand-written backward.

Autodiff through shifted slices of a padded array costs ~24x the forward on CPU (every slice's
transpose pads a full-size zero array); the explicit backward below is two more shifted sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _shifted_sum(x: jax.Array, w: jax.Array, reverse: bool) -> jax.Array:
    """sum_k w[k] * x shifted so that output t sees x[t - (K-1) + k] (or the mirror when reverse)."""
    width, length = w.shape[0], x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, width - 1) if reverse else (width - 1, 0)
    xp = jnp.pad(x, pad)
    out = None
    for k in range(width):
        start = width - 1 - k if reverse else k
        term = jax.lax.slice_in_dim(xp, start, start + length, axis=1) * w[k]
        out = term if out is None else out + term
    return out


@jax.custom_vjp
def causal_conv1d(x: Float[Array, "b l *c"], weight: Float[Array, "k *c"],
                  bias: Float[Array, "*c"]) -> Float[Array, "b l *c"]:
    """y[t] = bias + sum_k weight[k] * x[t - K + 1 + k], zeros before the start; channels independent."""
    return _shifted_sum(x, weight.astype(x.dtype), reverse=False) + bias.astype(x.dtype)


def _fwd(x, weight, bias):
    return causal_conv1d(x, weight, bias), (x, weight, bias)


def _bwd(res, dy):
    x, weight, bias = res
    width, length = weight.shape[0], x.shape[1]
    dx = _shifted_sum(dy, weight.astype(dy.dtype), reverse=True)
    xp = jnp.pad(x, [(0, 0), (width - 1, 0)] + [(0, 0)] * (x.ndim - 2)).astype(jnp.float32)
    dy32 = dy.astype(jnp.float32)
    dw = jnp.stack([jnp.sum(jax.lax.slice_in_dim(xp, k, k + length, axis=1) * dy32, axis=(0, 1))
                    for k in range(width)])
    db = jnp.sum(dy32, axis=(0, 1))
    return dx.astype(x.dtype), dw.astype(weight.dtype), db.astype(bias.dtype)


causal_conv1d.defvjp(_fwd, _bwd)
