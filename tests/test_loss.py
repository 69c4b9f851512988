"""The fused LM-head cross-entropy equals cross-entropy on materialised logits (values and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from nemojax.loss import lm_head_loss
from tests.reference import next_token_loss


def rel(a, b):
    return float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))


@pytest.mark.parametrize("chunk_logits", [37 * 6, 37 * 8, 37 * 64])  # 16 targets: 3 chunks of 6 (2 padded), 2, 1
@pytest.mark.parametrize("masked", [False, True])
def test_fused_loss_matches_logits_loss(chunk_logits, masked):
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (2, 9, 16))
    head = jax.random.normal(k[1], (16, 37))
    tokens = jax.random.randint(k[2], (2, 9), 0, 37)
    mask = jax.random.bernoulli(k[3], 0.7, (2, 9)) if masked else None

    fused = jax.value_and_grad(lambda h, w: lm_head_loss(h, w, tokens, mask, chunk_logits), argnums=(0, 1))
    plain = jax.value_and_grad(lambda h, w: next_token_loss(h @ w, tokens, mask), argnums=(0, 1))
    (loss, grads), (loss_ref, grads_ref) = fused(hidden, head), plain(hidden, head)
    assert abs(float(loss) - float(loss_ref)) <= 1e-6 * float(loss_ref)
    undifferentiated = lm_head_loss(hidden, head, tokens, mask, chunk_logits)  # the loss-only path
    assert abs(float(undifferentiated) - float(loss_ref)) <= 1e-6 * float(loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) < 1e-6


def test_all_masked_is_zero_not_nan():
    hidden, head = jnp.ones((1, 4, 3)), jnp.ones((3, 5))
    tokens, mask = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), bool)
    assert float(lm_head_loss(hidden, head, tokens, mask)) == 0.0
