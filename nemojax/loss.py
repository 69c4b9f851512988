"""The one next-token loss over the LM head, for training, evaluation and scoring.

Every path walks the tokens in chunks of about 2**24 logits, so the [tokens, vocab] logits of a whole
batch never exist at once:
- `lm_head_loss`: the training loss; differentiated, it computes the gradients in the same walk
  (`_fused_loss`), which removes the full logits' softmax gradient and one of the four vocabulary-sized
  matmuls;
- `token_logprobs`: each token's log-probability and whether it was the greedy choice (scoring);
- `eval_sums` / `eval_totals` / `eval_metrics`: summed NLL and recall hits of held-out batches (the trainer's evaluation
  and eval.py's recall task).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

f32 = jnp.float32


def _targets_and_weights(tokens, mask):
    targets = tokens[:, 1:]
    weights = jnp.ones(targets.shape, f32) if mask is None else mask[:, 1:].astype(f32)
    return targets, weights


def _tokens_per_chunk(n_tokens: int, vocab: int, chunk_logits: int) -> int:
    """Equal chunks of about `chunk_logits` logits: at most (chunks - 1) padded tokens."""
    n_chunks = -(-n_tokens // max(1, min(n_tokens, chunk_logits // vocab)))
    return -(-n_tokens // n_chunks)


def lm_head_loss(hidden: Float[Array, "b l d"], head: Float[Array, "d v"], tokens: Int[Array, "b l"],
                 mask: Bool[Array, "b l"] | None = None, chunk_logits: int = 2**24) -> Float[Array, ""]:
    """Mean fp32 cross-entropy of predicting tokens[:, t+1] from hidden[:, t] @ head over unmasked targets
    (`mask[:, t]` says whether target tokens[:, t] counts; position 0 is never a target)."""
    _, weights = _targets_and_weights(tokens, mask)
    return weighted_nll(hidden, head, tokens, weights / jnp.maximum(jnp.sum(weights), 1.0), chunk_logits)


def weighted_nll(hidden: Float[Array, "b l d"], head: Float[Array, "d v"], tokens: Int[Array, "b l"],
                 weights: Float[Array, "b l-1"], chunk_logits: int = 2**24) -> Float[Array, ""]:
    """sum_t weights[:, t] x NLL of tokens[:, t+1] from hidden[:, t] @ head, with the fused gradient (any
    real weights: DPO weighs each reply's tokens by the loss's derivative with respect to its log-prob)."""
    b, length, d = hidden.shape
    tokens_per_chunk = _tokens_per_chunk(b * (length - 1), head.shape[1], chunk_logits)
    return _fused_loss(tokens_per_chunk)(hidden[:, :-1].reshape(-1, d), head, tokens[:, 1:].reshape(-1),
                                         weights.reshape(-1).astype(f32))


def token_logprobs(hidden: Float[Array, "b l d"], head: Float[Array, "d v"], tokens: Int[Array, "b l"],
                   chunk_logits: int = 2**24) -> tuple[Float[Array, "b l-1"], Bool[Array, "b l-1"]]:
    """log p(tokens[:, t+1] | ..t) from hidden[:, t] @ head, and whether that token was the argmax."""
    b, length, d = hidden.shape
    n_tokens = b * (length - 1)
    size = _tokens_per_chunk(n_tokens, head.shape[1], chunk_logits)
    chunks = (_chunked(hidden[:, :-1].reshape(-1, d), size), _chunked(tokens[:, 1:].reshape(-1), size))

    def score(chunk):
        h, targets = chunk
        logits = jnp.einsum("td,dv->tv", h, head.astype(h.dtype), preferred_element_type=f32)
        target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return target_logit - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets

    logprobs, greedy = jax.lax.map(score, chunks)
    return (logprobs.reshape(-1)[:n_tokens].reshape(b, length - 1),
            greedy.reshape(-1)[:n_tokens].reshape(b, length - 1))


def _chunked(t: jax.Array, size: int) -> jax.Array:
    """[tokens, ...] -> [chunks, size, ...], zero-padded (padded tokens get weight 0)."""
    t = jnp.pad(t, [(0, -t.shape[0] % size)] + [(0, 0)] * (t.ndim - 1))
    return t.reshape(-1, size, *t.shape[1:])


def _chunk_nll(h, head, targets, weights):
    """Weighted summed NLL of one token chunk, and d(that)/d(logits)."""
    logits = jnp.einsum("td,dv->tv", h, head, preferred_element_type=f32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    one_hot = jnp.arange(logits.shape[1])[None, :] == targets[:, None]
    dlogits = (jnp.exp(logits - lse[:, None]) - one_hot) * weights[:, None]
    return jnp.sum(weights * (lse - target_logit)), dlogits


def _chunk_grads(h, head, targets, weights):
    """One chunk's summed NLL and its gradients with respect to the chunk's hidden states and the head."""
    nll, dlogits = _chunk_nll(h, head, targets, weights)
    dh = jnp.einsum("tv,dv->td", dlogits.astype(h.dtype), head, preferred_element_type=f32)
    return nll, dh, jnp.einsum("dt,tv->dv", h.T.astype(f32), dlogits)


@functools.lru_cache(maxsize=None)
def _fused_loss(tokens_per_chunk: int):
    """sum_t weights_t * nll_t over flat tokens, chunk by chunk.

    Under differentiation the forward also computes the gradients (the loss is a scalar, so the
    backward only scales them): three [tokens, d] x [d, vocab] matmuls per step instead of the four a
    recomputing backward needs. The chunks run through `lax.scan`, so only one chunk's logits live;
    the first chunk runs before the scan and starts the head-gradient sum (no zero-filled [d, vocab]).
    """

    def loss_only(h, head, targets, weights):
        def step(total, chunk):
            return total + _chunk_nll(*chunk[:1], head.astype(h.dtype), *chunk[1:])[0], None

        chunks = tuple(_chunked(t, tokens_per_chunk) for t in (h, targets, weights))
        return jax.lax.scan(step, jnp.zeros((), f32), chunks)[0]

    @jax.custom_vjp
    def fused(h, head, targets, weights):
        return loss_only(h, head, targets, weights)

    def fwd(h, head, targets, weights):
        head_c = head.astype(h.dtype)

        def step(carry, chunk):
            nll, dh, dhead = _chunk_grads(chunk[0], head_c, *chunk[1:])
            return (carry[0] + nll, carry[1] + dhead), dh

        chunks = tuple(_chunked(t, tokens_per_chunk) for t in (h, targets, weights))
        loss, dh_first, dhead = _chunk_grads(chunks[0][0], head_c, *(t[0] for t in chunks[1:]))
        (loss, dhead), dh_rest = jax.lax.scan(step, (loss, dhead), tuple(t[1:] for t in chunks))
        dh = jnp.concatenate([dh_first[None], dh_rest]).reshape(-1, h.shape[1])[:h.shape[0]]
        return loss, (dh.astype(h.dtype), dhead.astype(head.dtype))

    def bwd(grads, g):
        dh, dhead = grads
        return (g * dh).astype(dh.dtype), (g * dhead).astype(dhead.dtype), None, None

    fused.defvjp(fwd, bwd)
    return fused


def eval_sums(model, params: Any, batch: dict) -> dict[str, Float[Array, ""]]:
    """Summed NLL and target count of a held-out batch, and (when the batch marks them) recalled-digit
    hits and count."""
    tokens, mask = batch["tokens"], batch["mask"]
    hidden = model.apply({"params": params}, tokens, segment_ids=batch.get("segment_ids"), method="hidden")
    logprobs, greedy = token_logprobs(hidden, model.apply({"params": params}, method="head_weight"), tokens)
    weights = mask[:, 1:].astype(f32)
    out = {"nll_sum": -jnp.sum(logprobs * weights), "targets": jnp.sum(weights)}
    if "recall" in batch:
        recall = batch["recall"][:, 1:].astype(f32)
        out["recall_hits"] = jnp.sum(greedy * recall)
        out["recall_count"] = jnp.sum(recall)
    return out


def eval_totals(sums: Iterable[dict]) -> dict[str, float]:
    """The per-batch `eval_sums` added up on the host (loss = nll_sum / targets, accuracy = hits / count)."""
    totals: dict[str, float] = {}
    for out in sums:
        for k, v in jax.device_get(out).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    """`eval_loss` (mean NLL per target) and, for recall batches, `recall_accuracy`, from `eval_totals`."""
    metrics = {"eval_loss": totals["nll_sum"] / max(totals["targets"], 1.0)}
    if totals.get("recall_count"):
        metrics["recall_accuracy"] = totals["recall_hits"] / totals["recall_count"]
    return metrics
