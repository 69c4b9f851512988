"""Plain computations the tests compare the library against (not used by the library itself)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.loss import lm_head_loss

f32 = jnp.float32


def next_token_loss(logits, tokens, mask=None):
    """Mean fp32 cross-entropy of tokens[:, t+1] given logits[:, t] over unmasked targets, from the full
    logits (the textbook form `nemojax.loss` avoids)."""
    logits = logits[:, :-1].astype(f32)
    targets = tokens[:, 1:]
    weights = jnp.ones(targets.shape, f32) if mask is None else mask[:, 1:].astype(f32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def model_loss(model, params, tokens, mask=None):
    """A `NemotronH`'s training loss: its hidden states through the fused LM-head cross-entropy."""
    hidden = model.apply({"params": params}, tokens, method="hidden")
    head = model.apply({"params": params}, method="head_weight")
    return lm_head_loss(hidden, head.astype(hidden.dtype), tokens, mask)
