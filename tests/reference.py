"""Plain computations the tests compare the library against (not used by the library itself)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jaxtyping import Array, Float

from nemojax.config import ModelConfig
from nemojax.loss import lm_head_loss
from nemojax.ops.ssd import ssd_step

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


def ssd_sequential(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, " h"],
    B: Float[Array, "b l g n"],
    C: Float[Array, "b l g n"],
    D: Float[Array, " h"] | None = None,
    initial_state: Float[Array, "b h p n"] | None = None,
) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """`ssd_step` token by token (slow, but obviously right)."""
    b, _, h, p = x.shape
    n = B.shape[-1]
    state = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)

    def step(state, inputs):
        y, state = ssd_step(state, *inputs[:2], A, *inputs[2:], D)
        return state, y

    state, ys = jax.lax.scan(step, state, tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C)))
    return jnp.moveaxis(ys, 0, 1), state


def save_params(path: str, params: Any, cfg: ModelConfig) -> None:
    """A parameter-only Orbax checkpoint (`params` + `model` items), as the converter writes one."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(os.path.abspath(path), args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), model=ocp.args.JsonSave(cfg.to_hf())))
