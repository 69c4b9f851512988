"""The sampling rule shared by plain and speculative decoding: temperature, top-k, top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the `top_k`
    most likely tokens (0: all) and to the smallest set whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def sampling_logits(logits: Float[Array, "*b v"], sampling: Sampling) -> Float[Array, "*b v"]:
    """fp32 logits -> the sampled distribution's logits (temperature applied, tokens outside top-k / top-p
    at -inf); softmax of them is the distribution `sample` draws from (temperature > 0)."""
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def sample(logits: Float[Array, "*b v"], key: jax.Array, sampling: Sampling) -> Int[Array, " *b"]:
    """One token per row from fp32 logits."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, sampling_logits(logits, sampling), axis=-1).astype(jnp.int32)
