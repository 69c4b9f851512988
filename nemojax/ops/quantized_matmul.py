"""A linear layer's GEMMs in a low-precision format (`nemojax.precision.LinearFormat`), as a custom VJP:
the forward x W, the data gradient dy W^T and the weight gradient x^T dy each quantize their two inputs along
the contracted axis as the format says (`nemojax.quant`), then multiply with fp32 accumulation.

Quantization is simulated: each input is quantized and dequantized, and the product of the dequantized
values runs in fp32 (exactly the products a low-precision GEMM forms, summed in fp32 as its tensor cores
do). On CUDA, FP8 per-tensor GEMMs run natively instead: `dot_general` on the float8 values with an fp32
result, times the two scales (Hopper's FP8 tensor cores; the choice is made when the program is lowered).

The weight gradient's inputs are quantized along tokens. NVFP4 first applies a 16x16 random Hadamard
transform to both, 16 tokens at a time (it cancels in x^T dy and spreads outliers); for the experts' grouped
GEMM each expert's tokens are padded to whole blocks first, so no block mixes two experts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax import quant
from nemojax.ops.grouped_matmul import grouped_matmul, pad_groups
from nemojax.precision import LinearFormat, Operand

f32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST


def _pad_to(t: Array, axis: int, multiple: int) -> Array:
    extra = -t.shape[axis] % multiple
    if not extra:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, extra)
    return jnp.pad(t, widths)


def quantize(t: Float[Array, "m n"], op: Operand, axis: int, key: jax.Array | None = None) -> quant.Quantized:
    """`t` quantized along `axis` (moved last, then padded with zeros to whole blocks, which changes no
    amax), as `op` says; `key` draws the stochastic rounding when `op` rounds stochastically."""
    t = jnp.moveaxis(t, axis, -1)
    key = key if op.stochastic else None
    if op.scheme == "fp8":
        return quant.fp8(t, op.dtype, key)
    if op.scheme == "mxfp8":
        return quant.mxfp8(_pad_to(t, -1, quant.MXFP8_BLOCK), op.dtype, key)
    rows, cols = op.block
    return quant.nvfp4(_pad_to(_pad_to(t, -1, cols), -2, rows), op.block, key)


def fake_quantize(t: Float[Array, "m n"], op: Operand, axis: int, key: jax.Array | None = None
                  ) -> Float[Array, "m n"]:
    """What `t` becomes in `op`'s format (fp32, t's shape)."""
    moved = jnp.moveaxis(t, axis, -1)
    q = quantize(t, op, axis, key).dequantize()
    return jnp.moveaxis(q[tuple(slice(0, n) for n in moved.shape)], -1, axis)


def native_fp8_dot(a: jax.Array, b: jax.Array, op_a: Operand, op_b: Operand, key_a, key_b) -> jax.Array:
    """a @ b on the float8 values, fp32 result, times the per-tensor scales (native on Hopper)."""
    qa, qb = quant.fp8(a, op_a.dtype, key_a), quant.fp8(b, op_b.dtype, key_b)
    product = jax.lax.dot(qa.values, qb.values, precision=jax.lax.Precision.DEFAULT, preferred_element_type=f32)
    return product * (qa.scales * qb.scales)


def _product(a: Float[Array, "m c"], b: Float[Array, "c n"], op_a: Operand, op_b: Operand,
             key_a: jax.Array | None = None, key_b: jax.Array | None = None) -> Float[Array, "m n"]:
    """a @ b with both inputs quantized along c (fp32)."""
    def simulated(a, b):
        return jnp.matmul(fake_quantize(a, op_a, 1, key_a), fake_quantize(b, op_b, 0, key_b), precision=HIGHEST)

    if op_a.scheme == op_b.scheme == "fp8":
        return jax.lax.platform_dependent(a, b, cuda=lambda a, b: native_fp8_dot(a, b, op_a, op_b, key_a, key_b),
                                          default=simulated)
    return simulated(a, b)


def _hadamard_tokens(t: Float[Array, "t n"], transform: Float[Array, "k k"]) -> Float[Array, "t2 n"]:
    return quant.hadamard_rows(_pad_to(t.astype(f32), 0, transform.shape[0]), transform)


def _backward_keys(key: jax.Array | None, fmt: LinearFormat):
    if key is None:
        if fmt.needs_key:
            raise ValueError(f"the {fmt.name} format's backward pass draws random numbers (stochastic rounding, "
                             "Hadamard signs): apply the model with rngs={'quant': key} to take gradients")
        return None, None, None
    return tuple(jax.random.split(key, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantized_matmul(x, w, fmt, key):
    return _product(x, w, fmt.x, fmt.w).astype(x.dtype)


def _forward(x, w, fmt, key):
    return _quantized_matmul(x, w, fmt, key), (x, w, key)


def _weight_gradient_inputs(x, dy, fmt: LinearFormat, key):
    if fmt.hadamard:
        transform = quant.hadamard(key)
        return _hadamard_tokens(x, transform), _hadamard_tokens(dy, transform)
    return x, dy


def _backward(fmt, residuals, dy):
    x, w, key = residuals
    dgrad_key, wgrad_key, hadamard_key = _backward_keys(key, fmt)
    dx = _product(dy, w.T, fmt.dy, fmt.w, dgrad_key)
    x_t, dy_t = _weight_gradient_inputs(x, dy, fmt, hadamard_key)
    dw = _product(x_t.T, dy_t, fmt.x_t, fmt.dy_t, None, wgrad_key)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_quantized_matmul.defvjp(_forward, _backward)


def quantized_matmul(x: Float[Array, "t k"], w: Float[Array, "k n"], fmt: LinearFormat,
                     key: jax.Array | None = None) -> Float[Array, "t n"]:
    """x @ w with every GEMM, forward and backward, in `fmt`; `key` (needed for gradients when the format
    rounds stochastically) draws the backward's random numbers."""
    return _quantized_matmul(x, w, fmt, key)


# ----- the experts' grouped GEMM --------------------------------------------------------------------------


def _per_group(w: Float[Array, "g k n"], op: Operand, axis: int) -> Float[Array, "g k n"]:
    """Each group's weight quantized alone (its own tensor scale, as each expert's GEMM has)."""
    return jax.vmap(lambda m: fake_quantize(m, op, axis))(w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _quantized_grouped(x, w, group_sizes, fmt, key):
    return grouped_matmul(fake_quantize(x, fmt.x, 1), _per_group(w, fmt.w, 0), group_sizes).astype(x.dtype)


def _grouped_forward(x, w, group_sizes, fmt, key):
    return _quantized_grouped(x, w, group_sizes, fmt, key), (x, w, group_sizes, key)


def _grouped_backward(fmt, residuals, dy):
    x, w, group_sizes, key = residuals
    dgrad_key, wgrad_key, hadamard_key = _backward_keys(key, fmt)
    w_t = _per_group(jnp.swapaxes(w, 1, 2), fmt.w, 0)
    dx = grouped_matmul(fake_quantize(dy, fmt.dy, 1, dgrad_key), w_t, group_sizes)
    # Weight gradient: each group's tokens padded to whole blocks, so blocks and transforms stay in a group.
    block = math.lcm(fmt.token_block, quant.HADAMARD_SIZE if fmt.hadamard else 1)
    (x_p, dy_p), padded_sizes = pad_groups((x, dy), group_sizes, block)
    x_t, dy_t = _weight_gradient_inputs(x_p, dy_p, fmt, hadamard_key)
    x_q, dy_q = fake_quantize(x_t, fmt.x_t, 0), fake_quantize(dy_t, fmt.dy_t, 0, wgrad_key)
    _, weight_vjp = jax.vjp(lambda w: grouped_matmul(x_q, w, padded_sizes), w.astype(f32))
    (dw,) = weight_vjp(dy_q)
    return dx.astype(x.dtype), dw.astype(w.dtype), None, None


_quantized_grouped.defvjp(_grouped_forward, _grouped_backward)


def quantized_grouped_matmul(x: Float[Array, "m k"], w: Float[Array, "g k n"], group_sizes: Int[Array, " g"],
                             fmt: LinearFormat, key: jax.Array | None = None) -> Float[Array, "m n"]:
    """`grouped_matmul` (rows sorted by group) with every GEMM in `fmt`. Activations and gradients have one
    tensor scale over all groups' rows; each group's weight has its own."""
    return _quantized_grouped(x, w, group_sizes, fmt, key)
