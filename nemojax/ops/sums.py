"""Reductions over leading axes written as matrix-vector products.

XLA:CPU reduces over a major axis by first transposing the whole operand (~10x the cost of the sum
itself); as a ones-vector product the same sum streams the array once through the matmul library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_leading(x: jax.Array, n_axes: int) -> jax.Array:
    """x summed over its first `n_axes` axes, in float32."""
    rows = 1
    for size in x.shape[:n_axes]:
        rows *= size
    flat = x.reshape(rows, -1).astype(jnp.float32)
    return jnp.einsum("t,tc->c", jnp.ones((rows,), jnp.float32), flat).reshape(x.shape[n_axes:])


def sum_last(x: jax.Array) -> jax.Array:
    """x summed over its last axis, in float32, as a matrix-vector product."""
    return jnp.einsum("...k,k->...", x.astype(jnp.float32), jnp.ones((x.shape[-1],), jnp.float32))
