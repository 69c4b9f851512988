"""Model construction: logical axis names on every parameter, init, the hand-written norm backward, and
the MoE's grouped matmul."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.blocks import hf_table
from nemojax.layers.norms import gated_group_rms_norm, rms_normalize
from nemojax.ops.grouped_matmul import BLOCK, grouped_matmul
from tests.conftest import MODELS


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_init_annotates_every_parameter_and_matches_the_hf_table(kind):
    cfg = nemojax.ModelConfig(**MODELS[kind])
    boxed = jax.eval_shape(nemojax.NemotronH(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)

    # The checkpoint table describes exactly the parameters the model creates, with the same shapes.
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            nn.unbox(boxed), is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))[0]:
        shapes[tuple(k.key for k in path)] = leaf.shape
    table = {path: shape for entry in hf_table(cfg) for path, shape in entry.ours}
    assert table == shapes


def test_gated_norm_backward_equals_autodiff():
    k = jax.random.split(jax.random.key(0), 4)
    y, z = jax.random.normal(k[0], (2, 5, 6, 4)), jax.random.normal(k[1], (2, 5, 6, 4))
    scale, cot = jax.random.normal(k[2], (6, 4)), jax.random.normal(k[3], (2, 5, 6, 4))

    def plain(y, z, scale):
        gated = (y * jax.nn.silu(z)).reshape(2, 5, 3, 8)
        return scale * rms_normalize(gated, 1e-5).reshape(y.shape)

    got = jax.grad(lambda *a: jnp.sum(gated_group_rms_norm(*a, 3, 1e-5) * cot), argnums=(0, 1, 2))(y, z, scale)
    want = jax.grad(lambda *a: jnp.sum(plain(*a) * cot), argnums=(0, 1, 2))(y, z, scale)
    for g, w in zip(got, want):
        assert float(jnp.max(jnp.abs(g - w))) < 1e-5 * float(jnp.max(jnp.abs(w)))


def test_grouped_matmul_equals_ragged_dot_and_runs_blocked_on_the_cpu():
    """Values and gradients equal `jax.lax.ragged_dot`'s for group sizes with empty groups, groups of
    several blocks and partial blocks, and sizes that leave rows past the last group (zeros there)."""
    k = jax.random.split(jax.random.key(0), 3)
    rows, groups = 3 * BLOCK + 22, 6
    x, w = jax.random.normal(k[0], (rows, 13)), jax.random.normal(k[1], (groups, 13, 11))
    cot = jax.random.normal(k[2], (rows, 11))

    def value_and_grads(matmul, sizes):
        return jax.value_and_grad(lambda x, w: jnp.sum(matmul(x, w, sizes) * cot), argnums=(0, 1))(x, w)

    ours, reference = jax.jit(lambda s: value_and_grads(grouped_matmul, s)), jax.jit(
        lambda s: value_and_grads(jax.lax.ragged_dot, s))
    for sizes in ([0, BLOCK + 5, 3, 0, 2 * BLOCK, 14], [10, 0, 0, 5, 1, 0], [rows, 0, 0, 0, 0, 0]):
        sizes = jnp.asarray(sizes, jnp.int32)
        (got, got_grads), (want, want_grads) = ours(sizes), reference(sizes)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g, r in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))
    direct = jax.jit(grouped_matmul)(x, w, sizes)
    np.testing.assert_allclose(direct, jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-5)

    # The CPU lowering is the blocked loop; other platforms keep ragged_dot (XLA's grouped GEMM there).
    lowered = {platform: jax.export.export(jax.jit(grouped_matmul), platforms=[platform])(
        x, w, sizes).mlir_module() for platform in ("cpu", "tpu")}
    assert "stablehlo.while" in lowered["cpu"] and '"chlo.ragged_dot"' not in lowered["cpu"]
    assert '"chlo.ragged_dot"' in lowered["tpu"] and "stablehlo.while" not in lowered["tpu"]
