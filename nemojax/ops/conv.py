"""Depthwise causal 1-D convolution followed by SiLU; on the CPU, with a hand-written backward.

Autodiff through shifted slices of a padded array costs ~24x the forward on CPU (every slice's
transpose pads a full-size zero array); the explicit backward recomputes the pre-activation and
takes two more shifted sums, about twice the forward. It loops over time blocks, which only XLA:CPU
needs: GPUs and TPUs differentiate the plain op (`ops/platform.py`). Packed documents (`segment_ids`)
mask each tap where it would read across a document start, in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.ops.platform import on_cpu

f32 = jnp.float32


def _lag(x: jax.Array, lag: int, reverse: bool = False) -> jax.Array:
    """x[t - lag] along time (x[t + lag] when reverse), zeros beyond the edges."""
    length = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, lag) if reverse else (lag, 0)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), lag if reverse else 0, (lag if reverse else 0) + length, axis=1)


def _taps(reach: jax.Array | None, width: int, ndim: int) -> list[jax.Array | None]:
    """Per tap k, 1.0 where output t may read input t - (width - 1 - k): the input is in t's document
    (`reach` = how many earlier positions of its document t has); None without documents."""
    if reach is None:
        return [None] * width
    shape = (*reach.shape, *([1] * (ndim - 2)))
    return [(reach >= width - 1 - k).astype(f32).reshape(shape) for k in range(width)]


def document_reach(segment_ids: Int[Array, "b l"], width: int) -> Float[Array, "b l"]:
    """min(position within its document, width - 1): how far back each output's window stays in its
    document."""
    length = segment_ids.shape[1]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start_of = jax.lax.cummax(jnp.where(starts, jnp.arange(length), 0), axis=1)
    return jnp.minimum(jnp.arange(length) - start_of, width - 1).astype(f32)


def _pre_activation(x, weight, bias, reach):
    width = weight.shape[0]
    out = bias.astype(f32)
    for k, tap in enumerate(_taps(reach, width, x.ndim)):  # tap k reads input t - (width - 1 - k)
        lagged = _lag(x.astype(f32), width - 1 - k)
        out = out + (lagged if tap is None else lagged * tap) * weight[k].astype(f32)
    return out


def causal_conv1d_silu(x: Float[Array, "b l *c"], weight: Float[Array, "k *c"],
                       bias: Float[Array, "*c"], segment_ids: Int[Array, "b l"] | None = None) -> Float[Array, "b l *c"]:
    """silu(bias + sum_k weight[k] * x[t - K + 1 + k]), zeros before the start; channels independent.
    With `segment_ids` (packed documents) inputs from an earlier document count as zeros too."""
    reach = None if segment_ids is None else document_reach(segment_ids, weight.shape[0])
    return on_cpu(_conv_silu_blocked_backward, _conv_silu)(x, weight, bias, reach)


def _conv_silu(x, weight, bias, reach):
    return jax.nn.silu(_pre_activation(x, weight, bias, reach)).astype(x.dtype)


@jax.custom_vjp
def _conv_silu_blocked_backward(x, weight, bias, reach):
    return _conv_silu(x, weight, bias, reach)


def _fwd(x, weight, bias, reach):
    return _conv_silu(x, weight, bias, reach), (x, weight, bias, reach)


def _bwd(res, dy):
    """Blocked over time: each block recomputes its pre-activation, writes d(pre-activation) and
    accumulates the weight and bias sums; dx is then one shifted sum over the stored d(pre) (each tap's
    share masked where it crossed a document start).

    XLA:CPU, left to fuse this freely, recomputes the pre-activation inside every consumer and
    reduces over the (major) time axis with strided passes: about 4x slower.
    """
    x, weight, bias, reach = res
    width, (b, length) = weight.shape[0], x.shape[:2]
    channels = x.shape[2:]
    block = min(256, length)
    pad = -length % block
    flat = lambda t: t.astype(f32).reshape(b, length, -1)  # noqa: E731
    xp = jnp.pad(flat(x), [(0, 0), (width - 1, pad), (0, 0)])
    dyp = jnp.pad(flat(dy), [(0, 0), (0, pad), (0, 0)])
    reach_p = None if reach is None else jnp.pad(reach, [(0, 0), (0, pad)], constant_values=width - 1)
    w, bias32 = weight.astype(f32).reshape(width, -1), bias.astype(f32).reshape(-1)

    def step(i, carry):
        sums, dpre = carry
        xs = jax.lax.dynamic_slice_in_dim(xp, i * block, block + width - 1, axis=1)
        taps = _taps(None if reach_p is None else jax.lax.dynamic_slice_in_dim(reach_p, i * block, block, axis=1),
                     width, 3)
        windows = [xs[:, k:k + block] if tap is None else xs[:, k:k + block] * tap for k, tap in enumerate(taps)]
        pre = sum(windows[k] * w[k] for k in range(width)) + bias32
        sig = jax.nn.sigmoid(pre)
        d = jax.lax.dynamic_slice_in_dim(dyp, i * block, block, axis=1) * sig * (1 + pre * (1 - sig))
        sums = sums + jnp.stack([*(jnp.sum(windows[k] * d, axis=(0, 1)) for k in range(width)),
                                 jnp.sum(d, axis=(0, 1))])
        return sums, jax.lax.dynamic_update_slice_in_dim(dpre, d, i * block, axis=1)

    sums, dpre = jax.lax.fori_loop(0, (length + pad) // block, step,
                                   (jnp.zeros((width + 1, w.shape[1]), f32), jnp.zeros_like(dyp)))
    dpre = dpre[:, :length]  # dx[s] = sum_k w[k] * (dpre * tap_k)[s + width - 1 - k]
    dx = sum(_lag(dpre if tap is None else dpre * tap, width - 1 - k, reverse=True) * w[k]
             for k, tap in enumerate(_taps(reach, width, 3)))
    return (dx.reshape(x.shape).astype(x.dtype), sums[:width].reshape(weight.shape).astype(weight.dtype),
            sums[width].reshape(channels).astype(bias.dtype), None if reach is None else jnp.zeros_like(reach))


_conv_silu_blocked_backward.defvjp(_fwd, _bwd)


def conv_step(window: Float[Array, "b k *c"], weight: Float[Array, "k *c"], bias: Float[Array, "*c"]
              ) -> Float[Array, "b *c"]:
    """The newest output of `causal_conv1d_silu` from its last K inputs (decoding)."""
    window, weight = window.astype(f32), weight.astype(f32)
    pre = sum(window[:, k] * weight[k] for k in range(weight.shape[0])) + bias.astype(f32)  # elementwise, fused
    return jax.nn.silu(pre).astype(window.dtype)
