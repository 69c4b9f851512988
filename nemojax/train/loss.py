"""Next-token cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def next_token_loss(logits: Float[Array, "b l v"], tokens: Int[Array, "b l"],
                    mask: Bool[Array, "b l"] | None = None) -> Float[Array, ""]:
    """Mean fp32 cross-entropy of predicting tokens[:, t+1] from logits[:, t] over unmasked targets.

    `mask[:, t]` says whether target tokens[:, t] counts (position 0 is never a target).
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = tokens[:, 1:]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = jnp.ones_like(nll) if mask is None else mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
