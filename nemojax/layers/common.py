"""Helpers every layer shares: logically-partitioned parameters and the config's dtypes."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype: jnp.dtype) -> jax.Array:
    """A parameter annotated with logical axis names, so sharding rules alone decide its layout."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


def dense(x: jax.Array, kernel: jax.Array, spec: str, dtype: jnp.dtype) -> jax.Array:
    """`jnp.einsum` in the compute dtype (the kernel is cast from its storage dtype)."""
    return jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype))
