"""Blocked causal GQA attention (custom backward) against jax.nn.dot_product_attention."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from nemojax.ops.attention import causal_attention


def rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


# 21 positions: three blocks of 8, 8 and 5; one block of all 21.
@pytest.mark.parametrize("min_block,max_blocks", [(8, 8), (64, 32)])
def test_values_and_gradients(min_block, max_blocks):
    k = jax.random.split(jax.random.key(0), 4)
    b, length, h, g, d = 2, 21, 6, 2, 7
    q = jax.random.normal(k[0], (b, length, h, d))
    key = jax.random.normal(k[1], (b, length, g, d))
    v = jax.random.normal(k[2], (b, length, g, d))
    cot = jax.random.normal(k[3], q.shape)

    def ours(q, key, v):
        return causal_attention(q, key, v, min_block=min_block, max_blocks=max_blocks)

    def reference(q, key, v):
        return jax.nn.dot_product_attention(q, key, v, scale=1 / math.sqrt(d), is_causal=True)

    assert rel(jax.jit(ours)(q, key, v), reference(q, key, v)) < 1e-6
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * cot), argnums=(0, 1, 2)))(q, key, v)
    grads_ref = jax.grad(lambda *a: jnp.sum(reference(*a) * cot), argnums=(0, 1, 2))(q, key, v)
    for name, got, want in zip("qkv", grads, grads_ref):
        assert rel(got, want) < 1e-5, name
