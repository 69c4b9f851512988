"""Next-token cross-entropy: from logits, and fused with the LM head.

`lm_head_loss` never materialises the [tokens, vocab] logits: it walks the vocabulary in chunks, an
online log-sum-exp in the forward and a recomputing backward, so a chunk's logits stay in cache. On
the 110M benchmark model this removes the costliest part of a training step (the full logits' softmax
gradient, ~0.5 GB of memory traffic per step) and the logits' memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

f32 = jnp.float32


def _targets_and_weights(tokens, mask):
    targets = tokens[:, 1:]
    weights = jnp.ones(targets.shape, f32) if mask is None else mask[:, 1:].astype(f32)
    return targets, weights


def next_token_loss(logits: Float[Array, "b l v"], tokens: Int[Array, "b l"],
                    mask: Bool[Array, "b l"] | None = None) -> Float[Array, ""]:
    """Mean fp32 cross-entropy of predicting tokens[:, t+1] from logits[:, t] over unmasked targets.

    `mask[:, t]` says whether target tokens[:, t] counts (position 0 is never a target).
    """
    logits = logits[:, :-1].astype(f32)
    targets, weights = _targets_and_weights(tokens, mask)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def lm_head_loss(hidden: Float[Array, "b l d"], head: Float[Array, "d v"], tokens: Int[Array, "b l"],
                 mask: Bool[Array, "b l"] | None = None, vocab_chunk: int = 2048) -> Float[Array, ""]:
    """`next_token_loss(hidden @ head, tokens, mask)` without the full logits (equal up to fp32 rounding)."""
    b, length, d = hidden.shape
    targets, weights = _targets_and_weights(tokens, mask)
    h = hidden[:, :-1].reshape(-1, d)
    weights = weights.reshape(-1) / jnp.maximum(jnp.sum(weights), 1.0)
    return _fused_loss(vocab_chunk)(h, head, targets.reshape(-1), weights)


def _chunks(head, vocab_chunk):
    """Chunk width, count and the head padded to a whole number of chunks.

    A width that divides the vocabulary (down to half of `vocab_chunk`) avoids padding and masking.
    """
    vocab = head.shape[1]
    size = min(vocab_chunk, vocab)
    size = next((s for s in range(size, size // 2, -1) if vocab % s == 0), size)
    count = -(-vocab // size)
    if size * count != vocab:
        head = jnp.pad(head, ((0, 0), (0, size * count - vocab)))
    return size, count, head


def _chunk_logits(h, head_padded, start, size, vocab):
    w = jax.lax.dynamic_slice_in_dim(head_padded, start, size, axis=1)
    logits = jnp.einsum("td,dv->tv", h, w.astype(h.dtype), preferred_element_type=f32)
    column = start + jnp.arange(size)
    if head_padded.shape[1] != vocab:
        logits = jnp.where(column[None, :] < vocab, logits, -jnp.inf)
    return logits, column


def _forward(h, head, targets, weights, vocab_chunk):
    size, count, head_padded = _chunks(head, vocab_chunk)
    vocab, tokens = head.shape[1], h.shape[0]

    def step(carry, i):
        running_max, running_sum, target_logit = carry
        logits, column = _chunk_logits(h, head_padded, i * size, size, vocab)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=-1)
        target_logit += jnp.sum(jnp.where(column[None, :] == targets[:, None], logits, 0.0), axis=-1)
        return (new_max, running_sum, target_logit), None

    init = (jnp.full((tokens,), -jnp.inf, f32), jnp.zeros((tokens,), f32), jnp.zeros((tokens,), f32))
    (running_max, running_sum, target_logit), _ = jax.lax.scan(step, init, jnp.arange(count))
    lse = running_max + jnp.log(running_sum)
    return jnp.sum(weights * (lse - target_logit)), lse


@functools.lru_cache(maxsize=None)
def _fused_loss(vocab_chunk: int):
    """sum_t weights_t * nll_t for flat tokens, with a backward that recomputes each logits chunk."""

    @jax.custom_vjp
    def fused(h, head, targets, weights):
        return _forward(h, head, targets, weights, vocab_chunk)[0]

    def fwd(h, head, targets, weights):
        loss, lse = _forward(h, head, targets, weights, vocab_chunk)
        return loss, (h, head, targets, weights, lse)

    def bwd(res, g):
        h, head, targets, weights, lse = res
        size, count, head_padded = _chunks(head, vocab_chunk)
        vocab = head.shape[1]
        h_t = h.T  # transposed once, so every chunk's weight gradient is a plain matmul
        scale = (weights * g)[:, None]

        def step(carry, i):
            dh, dhead = carry
            logits, column = _chunk_logits(h, head_padded, i * size, size, vocab)
            dlogits = (jnp.exp(logits - lse[:, None]) - (column[None, :] == targets[:, None])) * scale
            w = jax.lax.dynamic_slice_in_dim(head_padded, i * size, size, axis=1).astype(f32)
            dh = dh + jnp.einsum("tv,dv->td", dlogits, w)
            dhead = jax.lax.dynamic_update_slice_in_dim(
                dhead, jnp.einsum("dt,tv->dv", h_t.astype(f32), dlogits), i * size, axis=1)
            return (dh, dhead), None

        init = (jnp.zeros(h.shape, f32), jnp.zeros(head_padded.shape, f32))
        (dh, dhead), _ = jax.lax.scan(step, init, jnp.arange(count))
        if dhead.shape[1] != vocab:
            dhead = dhead[:, :vocab]
        return dh.astype(h.dtype), dhead.astype(head.dtype), None, None

    fused.defvjp(fwd, bwd)
    return fused


def model_loss(model, params: dict, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"] | None = None
               ) -> Float[Array, ""]:
    """The training loss of a `NemotronH`: its hidden states through the fused LM-head cross-entropy."""
    hidden = model.apply({"params": params}, tokens, method="hidden")
    head = model.apply({"params": params}, method="head_weight")
    return lm_head_loss(hidden, head.astype(hidden.dtype), tokens, mask)
