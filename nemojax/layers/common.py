"""Helpers every layer shares: logically-partitioned parameters, the config's dtypes, `dense` and its
low-precision formats (`Gemms`), and the `Decoding` spec that switches mixers from training to cached
inference."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from nemojax import precision
from nemojax.ops.grouped_matmul import grouped_matmul
from nemojax.ops.matmul import matmul
from nemojax.ops.quantized_matmul import quantized_grouped_matmul, quantized_matmul

Initializer = Callable[..., jax.Array]


@struct.dataclass
class Decoding:
    """A cached-inference call. Mixers with state keep it in the "cache" variable collection.

    Prefill (`prefill=True`): right-padded prompts of `lengths[b]` real tokens fill fresh caches, with
    room for `max_new_tokens` more; padding never reaches a cache. A chunked prefill makes one such call
    per chunk of a `prompt_length`-token prompt, the chunk's first token at position `offset`, each
    continuing the caches the previous chunk left (Mamba states, conv windows, the prompt's keys and
    values), so its memory is bounded by the chunk. A decoding call: `t` new tokens per
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
    offset: Int[Array, ""] | int = 0
    prefill: bool = struct.field(pytree_node=False, default=False)
    prompt_length: int = struct.field(pytree_node=False, default=0)  # 0: the prefill call is the whole prompt
    max_new_tokens: int = struct.field(pytree_node=False, default=0)
    slots: int = struct.field(pytree_node=False, default=1)


def param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype: jnp.dtype) -> jax.Array:
    """A parameter annotated with logical axis names, so sharding rules alone decide its layout."""
    assert len(shape) == len(axes), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


@dataclasses.dataclass(frozen=True)
class Gemm:
    """How one linear layer multiplies: in one of `choices` (a `precision.LinearFormat`, or None for the
    compute dtype), the one at traced `index` when a scanned run's repeats differ; `key` draws the
    backward pass's stochastic rounding."""

    choices: tuple[precision.LinearFormat | None, ...] = (None,)
    index: jax.Array | None = None
    key: jax.Array | None = None
    observe: Callable[[jax.Array], None] | None = None  # sees each input (calibration)

    def _select(self, run: Callable) -> jax.Array:
        if len(self.choices) == 1:
            return run(self.choices[0])
        return jax.lax.switch(self.index, [functools.partial(run, fmt) for fmt in self.choices])

    def matmul(self, x: Float[Array, "t k"], w: Float[Array, "k n"]) -> Float[Array, "t n"]:
        if self.observe:
            self.observe(x)
        return self._select(lambda fmt: matmul(x, w) if fmt is None else quantized_matmul(x, w, fmt, self.key))

    def grouped(self, x: Float[Array, "m k"], w: Float[Array, "g k n"], group_sizes: Int[Array, " g"]
                ) -> Float[Array, "m n"]:
        if self.observe:
            self.observe(x)
        return self._select(lambda fmt: grouped_matmul(x, w, group_sizes) if fmt is None
                            else quantized_grouped_matmul(x, w, group_sizes, fmt, self.key))


@dataclasses.dataclass(frozen=True)
class Gemms:
    """A block's linear-layer formats (`precision.layer_formats`: per projection, the format at each
    repeat of its scanned run) and `repeat`, the traced index of the current repeat (None: not scanned)."""

    formats: precision.LayerFormats = ()
    repeat: jax.Array | None = None

    def of(self, module: nn.Module, projection: str) -> Gemm:
        """The projection's `Gemm` (compute dtype when the table does not name it). A format that rounds
        gradients stochastically takes a key from the "quant" rng stream when the apply call has one."""
        names = dict(self.formats).get(projection, ("bf16",))
        precision.note_traced(module, projection, names)
        choices = tuple(dict.fromkeys(names))
        formats = tuple(precision.FORMATS[name] for name in choices)
        index = None
        if len(choices) > 1:
            index = jnp.asarray([choices.index(name) for name in names], jnp.int32)[self.repeat]
        keyed = any(fmt is not None and fmt.needs_key for fmt in formats) and module.has_rng(precision.RNG_STREAM)
        observe = None
        if module.is_mutable_collection(precision.CALIBRATION):  # the input's amax, for post-training quantization
            observe = lambda x: module.sow(  # noqa: E731
                precision.CALIBRATION, projection, jnp.max(jnp.abs(x.astype(jnp.float32))),
                init_fn=lambda: jnp.zeros((), jnp.float32), reduce_fn=jnp.maximum)
        return Gemm(formats, index, module.make_rng(precision.RNG_STREAM) if keyed else None, observe)

    def under(self, prefix: str) -> "Gemms":
        """The formats of a sub-module's projections (`prefix.name` -> `name`), e.g. the shared expert's."""
        cut = len(prefix) + 1
        return Gemms(tuple((p[cut:], f) for p, f in self.formats if p.startswith(prefix + ".")), self.repeat)


def dense(x: jax.Array, kernel: jax.Array, in_axes: int, dtype: jnp.dtype, gemm: Gemm = Gemm()) -> jax.Array:
    """Contract the last `in_axes` axes of x with the first `in_axes` of kernel, in the compute dtype (or
    the low-precision format `gemm` says)."""
    lead, contracted = x.shape[:-in_axes], x.shape[-in_axes:]
    assert contracted == kernel.shape[:in_axes], (x.shape, kernel.shape)
    k = math.prod(contracted)
    y = gemm.matmul(x.astype(dtype).reshape(-1, k), kernel.astype(dtype).reshape(k, -1))
    return y.reshape(*lead, *kernel.shape[in_axes:])


def projection(module: nn.Module, name: str, x: jax.Array, init: Initializer, shape: Sequence[int],
               axes: Sequence[str | None], in_axes: int, bias: bool, param_dtype: jnp.dtype,
               dtype: jnp.dtype, gemm: Gemm = Gemm()) -> jax.Array:
    """`dense` with the weight `name` [*in, *out], plus a zero-initialised `{name}_bias` [*out] when `bias`
    (the config's use_bias / mlp_bias)."""
    y = dense(x, param(module, name, init, shape, axes, param_dtype), in_axes, dtype, gemm)
    if bias:
        y = y + param(module, f"{name}_bias", jax.nn.initializers.zeros, shape[in_axes:], axes[in_axes:],
                      param_dtype).astype(dtype)
    return y
