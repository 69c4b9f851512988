"""Low-precision formats (`nemojax/quant.py`) against references written here element by element with
numpy and ml_dtypes: values, scales, saturation; stochastic rounding; the random Hadamard transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemojax import quant

E4M3, E5M2, E2M1 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float4_e2m1fn
MAX = {E4M3: 448.0, E5M2: 57344.0, E2M1: 6.0}


def sample(shape, seed=0):
    """Normal values with outliers, so blocks and tensors have different ranges."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[rng.choice(x.size, max(1, x.size // 50), replace=False)] *= 30
    return x


def cast(x, dtype):
    """The reference cast: saturate, then ml_dtypes' round-to-nearest-even."""
    return np.clip(x, -MAX[dtype], MAX[dtype]).astype(dtype)


# Reference quantize-dequantize along the last axis, from the formats' definitions (test_precision.py uses them).
def ref_fp8(x, dtype):
    scale = np.float32(np.abs(x).max()) / np.float32(MAX[dtype])
    return cast(x / scale, dtype).astype(np.float32) * scale


def ref_mxfp8(x):
    out = np.zeros(x.shape, np.float32)
    for index in np.ndindex(x.shape[:-1]):
        for b in range(0, x.shape[-1], 32):
            block = x[index][b:b + 32]
            amax = np.abs(block).max()
            scale = np.float32(2.0 ** (np.floor(np.log2(amax)) - 8)) if amax > 0 else np.float32(1)
            out[index][b:b + 32] = cast(block / scale, E4M3).astype(np.float32) * scale
    return out


def ref_nvfp4(x, block):
    rows, cols = block
    tensor_scale = np.float32(np.abs(x).max()) / np.float32(6 * 448)
    out = np.zeros(x.shape, np.float32)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            piece = x[i:i + rows, j:j + cols]
            step = cast(np.float32(np.abs(piece).max()) / np.float32(6) / tensor_scale, E4M3).astype(np.float32)
            step = step * tensor_scale
            out[i:i + rows, j:j + cols] = cast(piece / step if step > 0 else piece, E2M1).astype(np.float32) * step
    return out


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_fp8_per_tensor_current_scaling(dtype):
    x = sample((24, 40))
    q = quant.fp8(jnp.asarray(x), {E4M3: quant.E4M3, E5M2: quant.E5M2}[dtype])
    scale = np.float32(np.abs(x).max()) / np.float32(MAX[dtype])
    np.testing.assert_array_equal(np.asarray(q.values).view(np.uint8), cast(x / scale, dtype).view(np.uint8))
    np.testing.assert_allclose(q.scales, scale, rtol=1e-7)
    np.testing.assert_array_equal(q.dequantize(), cast(x / scale, dtype).astype(np.float32) * scale)
    assert float(jnp.abs(q.values.astype(jnp.float32)).max()) == MAX[dtype]  # the amax maps to the top value


def test_saturation_and_zero_tensors():
    assert float(quant.round_to(jnp.asarray([1e6]), quant.E4M3)[0].astype(jnp.float32)) == 448.0
    assert float(quant.round_to(jnp.asarray([-7.5]), quant.E2M1)[0].astype(jnp.float32)) == -6.0
    zeros = quant.nvfp4(jnp.zeros((2, 32)))
    assert not np.any(np.asarray(zeros.dequantize())) and np.all(np.isfinite(np.asarray(zeros.dequantize())))


def test_mxfp8_power_of_two_block_scales():
    x = sample((6, 96))
    q = quant.mxfp8(jnp.asarray(x))
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            block = x[r, 32 * b:32 * (b + 1)]
            scale = np.float32(2.0 ** (np.floor(np.log2(np.abs(block).max())) - 8))  # E4M3's emax is 8
            assert float(q.scales[r, b].astype(jnp.float32)) == scale
            np.testing.assert_array_equal(np.asarray(q.values[r, 32 * b:32 * (b + 1)]).view(np.uint8),
                                          cast(block / scale, E4M3).view(np.uint8))
    assert q.scales.dtype == jnp.float8_e8m0fnu


@pytest.mark.parametrize("block", [(1, 16), (16, 16)], ids=["1x16", "16x16"])
def test_nvfp4_values_block_scales_and_tensor_scale(block):
    x = sample((32, 48), seed=1)
    q = quant.nvfp4(jnp.asarray(x), block)
    rows, cols = block
    tensor_scale = np.float32(np.abs(x).max()) / np.float32(6 * 448)
    np.testing.assert_allclose(q.tensor_scale, tensor_scale, rtol=1e-7)
    expected = np.zeros(x.shape, np.float32)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            piece = x[i:i + rows, j:j + cols]
            scale = cast(np.float32(np.abs(piece).max()) / np.float32(6) / tensor_scale, E4M3)
            assert np.asarray(q.scales[i // rows, j // cols]).view(np.uint8) == scale.view(np.uint8)
            step = np.float32(scale.astype(np.float32)) * tensor_scale
            values = cast(piece / step, E2M1)
            np.testing.assert_array_equal(np.asarray(q.values[i:i + rows, j:j + cols]).view(np.uint8),
                                          values.view(np.uint8))
            expected[i:i + rows, j:j + cols] = values.astype(np.float32) * step
    np.testing.assert_allclose(q.dequantize(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"does not divide into .* blocks"):
        quant.nvfp4(jnp.zeros((3, 20)), block)


def test_stochastic_rounding_is_unbiased_and_reproducible():
    values = jnp.asarray([0.2, 0.75, 1.1, 2.5, 3.3, 4.9, -0.3, -5.2], jnp.float32)
    draws = jnp.broadcast_to(values, (20000, values.size))
    rounded = quant.round_to(draws, quant.E2M1, jax.random.key(0)).astype(jnp.float32)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert set(np.unique(np.abs(np.asarray(rounded)))) <= set(grid)
    gaps = np.array([0.5, 0.5, 0.5, 1, 1, 2, 0.5, 2])  # the spacing around each value
    # mean error within 4 standard errors of a two-point draw (gap / 2 / sqrt(n) at most)
    np.testing.assert_array_less(np.abs(np.asarray(rounded.mean(0)) - np.asarray(values)),
                                 4 * gaps / 2 / np.sqrt(draws.shape[0]))
    again = quant.round_to(draws, quant.E2M1, jax.random.key(0)).astype(jnp.float32)
    np.testing.assert_array_equal(rounded, again)
    assert not np.array_equal(rounded, quant.round_to(draws, quant.E2M1, jax.random.key(1)).astype(jnp.float32))
    exact = jnp.asarray([0.5, 3.0, -6.0])  # representable values never move
    np.testing.assert_array_equal(quant.round_to(exact, quant.E2M1, jax.random.key(2)).astype(jnp.float32), exact)
    q = quant.nvfp4(jnp.asarray(sample((16, 32))), key=jax.random.key(3))  # and through a quantizer
    assert np.abs(np.asarray(q.dequantize()) - sample((16, 32))).max() < np.abs(sample((16, 32))).max() / 3


def test_random_hadamard_leaves_the_weight_gradient_unchanged():
    rng = np.random.default_rng(4)
    x, dy = (jnp.asarray(rng.standard_normal((64, n)), jnp.float32) for n in (24, 40))
    transform = quant.hadamard(jax.random.key(5))
    np.testing.assert_allclose(transform @ transform.T, np.eye(16), atol=1e-6)
    assert not np.allclose(transform, quant.hadamard(jax.random.key(6)))  # the signs are keyed
    mixed = quant.hadamard_rows(x, transform).T @ quant.hadamard_rows(dy, transform)
    np.testing.assert_allclose(mixed, x.T @ dy, rtol=1e-5, atol=1e-4)
    assert not np.allclose(quant.hadamard_rows(x, transform), x)
