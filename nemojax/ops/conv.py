"""Depthwise causal 1-D convolution followed by SiLU; on the CPU, with a hand-written backward.

Autodiff through shifted slices of a padded array costs ~24x the forward on CPU (every slice's
transpose pads a full-size zero array); the explicit backward recomputes the pre-activation and
takes two more shifted sums, about twice the forward. It loops over time blocks, which only XLA:CPU
needs: GPUs and TPUs differentiate the plain op (`ops/platform.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.ops.platform import on_cpu

f32 = jnp.float32


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


def _pre_activation(x, weight, bias):
    return _shifted_sum(x.astype(f32), weight.astype(f32), reverse=False) + bias.astype(f32)


def causal_conv1d_silu(x: Float[Array, "b l *c"], weight: Float[Array, "k *c"],
                       bias: Float[Array, "*c"], segment_ids: Int[Array, "b l"] | None = None) -> Float[Array, "b l *c"]:
    """silu(bias + sum_k weight[k] * x[t - K + 1 + k]), zeros before the start; channels independent.
    With `segment_ids` (packed documents) inputs from an earlier document count as zeros too."""
    if segment_ids is not None:
        return _conv_silu_in_documents(x, weight, bias, segment_ids)
    return on_cpu(_conv_silu_blocked_backward, _conv_silu)(x, weight, bias)


def _conv_silu_in_documents(x, weight, bias, segment_ids):
    """The conv with input t - j dropped where a document starts in (t - j, t] (autodiff backward)."""
    width, length = weight.shape[0], x.shape[1]
    xp = jnp.pad(x.astype(f32), [(0, 0), (width - 1, 0)] + [(0, 0)] * (x.ndim - 2))
    seg = jnp.pad(segment_ids, [(0, 0), (width - 1, 0)], constant_values=-1)
    pre = bias.astype(f32)
    for k in range(width):
        same = seg[:, k:k + length] == segment_ids  # the input's document is the output's
        same = same.reshape(*same.shape, *([1] * (x.ndim - 2)))
        pre = pre + jnp.where(same, xp[:, k:k + length], 0.0) * weight[k].astype(f32)
    return jax.nn.silu(pre).astype(x.dtype)


def _conv_silu(x, weight, bias):
    return jax.nn.silu(_pre_activation(x, weight, bias)).astype(x.dtype)


@jax.custom_vjp
def _conv_silu_blocked_backward(x, weight, bias):
    return _conv_silu(x, weight, bias)


def _fwd(x, weight, bias):
    return _conv_silu(x, weight, bias), (x, weight, bias)


def _bwd(res, dy):
    """Blocked over time: each block recomputes its pre-activation, writes d(pre-activation) and
    accumulates the weight and bias sums; dx is then one shifted sum over the stored d(pre).

    XLA:CPU, left to fuse this freely, recomputes the pre-activation inside every consumer and
    reduces over the (major) time axis with strided passes: about 4x slower.
    """
    x, weight, bias = res
    width, (b, length) = weight.shape[0], x.shape[:2]
    channels = x.shape[2:]
    block = min(256, length)
    pad = -length % block
    flat = lambda t: t.astype(f32).reshape(b, length, -1)  # noqa: E731
    xp = jnp.pad(flat(x), [(0, 0), (width - 1, pad), (0, 0)])
    dyp = jnp.pad(flat(dy), [(0, 0), (0, pad), (0, 0)])
    w, bias32 = weight.astype(f32).reshape(width, -1), bias.astype(f32).reshape(-1)

    def step(i, carry):
        sums, dpre = carry
        xs = jax.lax.dynamic_slice_in_dim(xp, i * block, block + width - 1, axis=1)
        windows = [xs[:, k:k + block] for k in range(width)]
        pre = sum(windows[k] * w[k] for k in range(width)) + bias32
        sig = jax.nn.sigmoid(pre)
        d = jax.lax.dynamic_slice_in_dim(dyp, i * block, block, axis=1) * sig * (1 + pre * (1 - sig))
        sums = sums + jnp.stack([*(jnp.sum(windows[k] * d, axis=(0, 1)) for k in range(width)),
                                 jnp.sum(d, axis=(0, 1))])
        return sums, jax.lax.dynamic_update_slice_in_dim(dpre, d, i * block, axis=1)

    sums, dpre = jax.lax.fori_loop(0, (length + pad) // block, step,
                                   (jnp.zeros((width + 1, w.shape[1]), f32), jnp.zeros_like(dyp)))
    dx = _shifted_sum(dpre[:, :length], w, reverse=True).reshape(x.shape)
    return (dx.astype(x.dtype), sums[:width].reshape(weight.shape).astype(weight.dtype),
            sums[width].reshape(channels).astype(bias.dtype))


_conv_silu_blocked_backward.defvjp(_fwd, _bwd)


def conv_step(window: Float[Array, "b k *c"], weight: Float[Array, "k *c"], bias: Float[Array, "*c"]
              ) -> Float[Array, "b *c"]:
    """The newest output of `causal_conv1d_silu` from its last K inputs (decoding)."""
    window, weight = window.astype(f32), weight.astype(f32)
    pre = sum(window[:, k] * weight[k] for k in range(weight.shape[0])) + bias.astype(f32)  # elementwise, fused
    return jax.nn.silu(pre).astype(window.dtype)
