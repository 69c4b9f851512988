"""Model construction: logical axis names on every parameter, init, and the hand-written norm backward."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import nemojax
from nemojax.checkpoint.hf_names import hf_table
from nemojax.layers.norms import gated_group_rms_norm, rms_normalize
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
