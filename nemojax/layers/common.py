"""Helpers every layer shares: logically-partitioned parameters, the config's dtypes, `dense`, and the
`Decoding` spec that switches mixers from training to cached inference."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Int

from nemojax.ops.matmul import matmul

Initializer = Callable[..., jax.Array]


@struct.dataclass
class Decoding:
    """A cached-inference call. Mixers with state keep it in the "cache" variable collection.

    Prefill (`prefill=True`): right-padded prompts of `lengths[b]` real tokens fill fresh caches, with
    room for `max_new_tokens` more; padding never reaches a cache. A decoding call: `t` new tokens per
    row, at positions `lengths[b] + step[b] + i` (`step`: the row's new tokens already cached; one
    scalar when every row advances together).

    Mamba layers keep their state after each of the last call's tokens, in `slots` slots (prefill fills
    every slot with the prompt's state), and a call continues row b from slot `resume[b]`: after a
    speculative verification, rolling a row back to its last accepted draft is choosing that slot.
    Attention caches need no rollback: a row reads only its first `step[b] + i + 1` new keys, so a
    rejected draft's keys are ignored and later overwritten.
    """

    lengths: Int[Array, " b"]
    step: Int[Array, " b"] | Int[Array, ""] | int = 0
    resume: Int[Array, " b"] | Int[Array, ""] | int = 0
    prefill: bool = struct.field(pytree_node=False, default=False)
    max_new_tokens: int = struct.field(pytree_node=False, default=0)
    slots: int = struct.field(pytree_node=False, default=1)


def param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype: jnp.dtype) -> jax.Array:
    """A parameter annotated with logical axis names, so sharding rules alone decide its layout."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


def dense(x: jax.Array, kernel: jax.Array, in_axes: int, dtype: jnp.dtype) -> jax.Array:
    """Contract the last `in_axes` axes of x with the first `in_axes` of kernel, in the compute dtype."""
    lead, contracted = x.shape[:-in_axes], x.shape[-in_axes:]
    assert contracted == kernel.shape[:in_axes], (x.shape, kernel.shape)
    k = math.prod(contracted)
    y = matmul(x.astype(dtype).reshape(-1, k), kernel.astype(dtype).reshape(k, -1))
    return y.reshape(*lead, *kernel.shape[in_axes:])


def projection(module: nn.Module, name: str, x: jax.Array, init: Initializer, shape: Sequence[int],
               axes: Sequence[str | None], in_axes: int, bias: bool, param_dtype: jnp.dtype,
               dtype: jnp.dtype) -> jax.Array:
    """`dense` with the weight `name` [*in, *out], plus a zero-initialised `{name}_bias` [*out] when `bias`
    (the config's use_bias / mlp_bias)."""
    y = dense(x, param(module, name, init, shape, axes, param_dtype), in_axes, dtype)
    if bias:
        y = y + param(module, f"{name}_bias", jax.nn.initializers.zeros, shape[in_axes:], axes[in_axes:],
                      param_dtype).astype(dtype)
    return y
