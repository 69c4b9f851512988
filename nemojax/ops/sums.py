"""Sums in float32 over leading or last axes; on the CPU, written as matrix-vector products.

XLA:CPU reduces over a major axis by first transposing the whole operand (~10x the cost of the sum
itself); as a ones-vector product the same sum streams the array once through the matmul library.
GPUs and TPUs get plain reductions (`ops/platform.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.ops.platform import on_cpu


def sum_leading(x: jax.Array, n_axes: int) -> jax.Array:
    """x summed over its first `n_axes` axes, in float32."""
    plain = lambda t: jnp.sum(t.astype(jnp.float32), axis=tuple(range(n_axes)))  # noqa: E731
    return on_cpu(functools.partial(_sum_leading_as_product, n_axes=n_axes), plain)(x)


def sum_last(x: jax.Array) -> jax.Array:
    """x summed over its last axis, in float32."""
    return on_cpu(_sum_last_as_product, lambda t: jnp.sum(t.astype(jnp.float32), axis=-1))(x)


def _sum_leading_as_product(x: jax.Array, n_axes: int) -> jax.Array:
    rows = 1
    for size in x.shape[:n_axes]:
        rows *= size
    flat = x.reshape(rows, -1).astype(jnp.float32)
    return jnp.einsum("t,tc->c", jnp.ones((rows,), jnp.float32), flat).reshape(x.shape[n_axes:])


def _sum_last_as_product(x: jax.Array) -> jax.Array:
    return jnp.einsum("...k,k->...", x.astype(jnp.float32), jnp.ones((x.shape[-1],), jnp.float32))
