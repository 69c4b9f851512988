"""The 2-D matmul every projection uses (`layers.common.dense`), with its XLA:CPU workaround."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.ops.platform import on_cpu


@jax.custom_vjp
def _matmul_explicit_transposes(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    tokens, k = x.shape
    n = w.shape[1]
    # The weight gradient contracts over tokens, so one operand must be transposed. XLA:CPU picks
    # the gradient and fuses its elementwise producers into the strided transpose (~25x a plain
    # one); transposing explicitly, on the side that moves fewer bytes, is much cheaper.
    if tokens * k <= tokens * n + k * n:
        dw = x.T @ dy
    else:
        dw = (dy.T @ x).T
    return (dy @ w.T).astype(x.dtype), dw.astype(w.dtype)


_matmul_explicit_transposes.defvjp(_matmul_fwd, _matmul_bwd)
# XLA:CPU gets the hand-written VJP; GPUs and TPUs the plain product, whose autodiff their compilers fuse.
matmul = on_cpu(_matmul_explicit_transposes, jnp.matmul)
