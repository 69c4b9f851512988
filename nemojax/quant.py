"""Low-precision number formats in pure JAX (docs/models.md, "Low precision"):

- FP8 E4M3 / E5M2 with per-tensor current scaling (the tensor's amax maps to the format's largest value);
- MXFP8: E4M3 values in blocks of 32 along the last axis, each with a power-of-two E8M0 scale (OCP MX);
- NVFP4: E2M1 values, an E4M3 scale per block of 16 (1 x 16 for activations and gradients, 16 x 16 for
  weights) and an fp32 per-tensor scale that keeps the block scales in E4M3's range;
- round-to-nearest-even (the casts') or stochastic rounding (keyed: the same key gives the same bits);
- the 16 x 16 random Hadamard transform NVFP4 training applies to both inputs of the weight-gradient GEMM.

Each quantizer returns a `Quantized` (values in the narrow dtype, scales); `dequantize` is the real number
each element stands for. Values beyond the format's range saturate to its largest magnitude.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jaxtyping import Array, Float

f32 = jnp.float32
E4M3, E5M2, E2M1, E8M0 = jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float4_e2m1fn, jnp.float8_e8m0fnu
NVFP4_BLOCK, MXFP8_BLOCK, HADAMARD_SIZE = 16, 32, 16


class Quantized(NamedTuple):
    """`values` x `scales` (broadcast over each block) x `tensor_scale` is the quantized tensor."""

    values: Array  # the narrow dtype, the input's shape
    scales: Array  # fp32 (FP8: a scalar; MXFP8 / NVFP4: one per block, as stored: E8M0 / E4M3 values)
    tensor_scale: Array  # fp32 scalar (1 for MXFP8)
    block: tuple[int, int]  # the (rows, columns) of one scale's block; (0, 0): the whole tensor

    def dequantize(self) -> Float[Array, "..."]:
        return self.values.astype(f32) * _per_element(self.scales, self.block) * self.tensor_scale


def _per_element(scales: Array, block: tuple[int, int]) -> Array:
    """Block scales (fp32) repeated over their blocks' elements."""
    scales = scales.astype(f32)
    if block == (0, 0):
        return scales
    rows, cols = block
    scales = jnp.repeat(scales, cols, axis=-1)
    return jnp.repeat(scales, rows, axis=-2) if rows > 1 else scales


def largest(dtype) -> float:
    return float(ml_dtypes.finfo(dtype).max)


@functools.lru_cache(maxsize=None)
def _magnitudes(dtype) -> np.ndarray:
    """Every finite non-negative value of a narrow float format (every bit pattern of its byte), ascending."""
    patterns = 16 if np.dtype(dtype) == np.dtype(ml_dtypes.float4_e2m1fn) else 256
    values = np.arange(patterns, dtype=np.uint8).view(np.dtype(dtype)).astype(np.float32)
    return np.unique(values[np.isfinite(values) & (values >= 0)])


def round_to(x: Float[Array, "..."], dtype, key: jax.Array | None = None) -> Array:
    """`x` (already scaled into range) in `dtype`, saturating: to the nearest value (ties to even), or with
    `key` stochastically, up with probability (x - lower) / (upper - lower), so the mean is x."""
    top = largest(dtype)
    x = jnp.clip(x.astype(f32), -top, top)
    if key is None:
        return x.astype(dtype)
    grid = jnp.asarray(_magnitudes(dtype))
    size = jnp.abs(x)
    upper_index = jnp.clip(jnp.searchsorted(grid, size, side="left"), 1, grid.size - 1)
    lower, upper = grid[upper_index - 1], grid[upper_index]
    up = jax.random.uniform(key, x.shape) * (upper - lower) < size - lower
    return (jnp.sign(x) * jnp.where(up, upper, lower)).astype(dtype)


def _safe(amax: Array) -> Array:
    return jnp.where(amax > 0, amax, 1.0)


def fp8(x: Float[Array, "..."], dtype=E4M3, key: jax.Array | None = None) -> Quantized:
    """Per-tensor current scaling: scale = amax / largest(dtype)."""
    scale = _safe(jnp.max(jnp.abs(x.astype(f32)))) / largest(dtype)
    return Quantized(round_to(x / scale, dtype, key), scale, jnp.ones((), f32), (0, 0))


def _blocks(x: Array, rows: int, cols: int) -> Array:
    """[..., m, n] -> [..., m / rows, rows, n / cols, cols] (or [..., n / cols, cols] when rows is 1)."""
    if rows == 1:
        return x.reshape(*x.shape[:-1], x.shape[-1] // cols, cols)
    return x.reshape(*x.shape[:-2], x.shape[-2] // rows, rows, x.shape[-1] // cols, cols)


def _block_amax(x: Array, rows: int, cols: int) -> Array:
    blocks = jnp.abs(_blocks(x.astype(f32), rows, cols))
    return jnp.max(blocks, axis=-1) if rows == 1 else jnp.max(blocks, axis=(-3, -1))


def _check_blocks(x: Array, rows: int, cols: int, what: str) -> None:
    if x.shape[-1] % cols or (rows > 1 and (x.ndim < 2 or x.shape[-2] % rows)):
        raise ValueError(f"{what}: shape {tuple(x.shape)} does not divide into {rows} x {cols} blocks")


def mxfp8(x: Float[Array, "... n"], dtype=E4M3, key: jax.Array | None = None) -> Quantized:
    """MXFP8: per 32 values along the last axis a power-of-two scale 2^(floor(log2 amax) - emax), emax
    the element format's largest exponent (E4M3: 8), so the block's amax lands in the top binade."""
    _check_blocks(x, 1, MXFP8_BLOCK, "mxfp8")
    emax = int(np.floor(np.log2(largest(dtype))))
    exponent = jnp.floor(jnp.log2(_safe(_block_amax(x, 1, MXFP8_BLOCK)))) - emax
    scales = jnp.exp2(jnp.clip(exponent, -127, 127)).astype(E8M0)
    scaled = x.astype(f32) / _per_element(scales, (1, MXFP8_BLOCK))
    return Quantized(round_to(scaled, dtype, key), scales, jnp.ones((), f32), (1, MXFP8_BLOCK))


def nvfp4(x: Float[Array, "... n"], block: tuple[int, int] = (1, NVFP4_BLOCK), key: jax.Array | None = None
          ) -> Quantized:
    """NVFP4: tensor scale amax / (6 x 448); per block an E4M3 scale (block amax / 6, in units of the
    tensor scale, rounded to nearest); values = x / (block scale x tensor scale) in E2M1. `block`: (1, 16)
    for activations and gradients, (16, 16) for weights."""
    rows, cols = block
    _check_blocks(x, rows, cols, "nvfp4")
    tensor_scale = _safe(jnp.max(jnp.abs(x.astype(f32)))) / (largest(E2M1) * largest(E4M3))
    block_scales = (_block_amax(x, rows, cols) / largest(E2M1) / tensor_scale).astype(E4M3)
    step = _per_element(block_scales, block) * tensor_scale  # what one unit of E2M1 is worth, per element
    scaled = x.astype(f32) / jnp.where(step > 0, step, 1.0)
    return Quantized(round_to(scaled, E2M1, key), block_scales, tensor_scale, block)


def hadamard(key: jax.Array, size: int = HADAMARD_SIZE) -> Float[Array, "n n"]:
    """An orthogonal random Hadamard matrix: Sylvester's H / sqrt(n) times a keyed diagonal of signs."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    signs = jnp.where(jax.random.bernoulli(key, 0.5, (size,)), 1.0, -1.0)
    return jnp.asarray(h / np.sqrt(size)) * signs[None, :]


def hadamard_rows(x: Float[Array, "t n"], transform: Float[Array, "k k"]) -> Float[Array, "t n"]:
    """The block-diagonal transform along the first (token) axis, k rows at a time (t divisible by k):
    applied to both inputs of a weight gradient X^T dY it cancels (T^T T = I), and spreads outliers
    before they are quantized."""
    k = transform.shape[0]
    if x.shape[0] % k:
        raise ValueError(f"hadamard_rows: {x.shape[0]} rows do not divide into blocks of {k}")
    return jnp.einsum("ij,bjn->bin", transform, x.reshape(-1, k, x.shape[-1])).reshape(x.shape)
