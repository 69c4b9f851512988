"""Causal grouped-query attention blocked over queries, with a recomputing backward (pure JAX).

Each query block attends only to its key prefix, so the causal half of the L x L work is skipped, and
one block's scores stay small enough to live in cache. The backward recomputes the probabilities from
the saved log-sum-exp instead of storing them (flash attention's idea, at XLA granularity). The
block loop is unrolled (at most `max_blocks` blocks), which is what lets every block have a static
key length. This is the CPU path; accelerators use cuDNN / splash kernels (see `attention_impl`).

`attention_at` is the same attention for queries that start later than the keys (a sequence shard's
against all-gathered keys, a prefill chunk's against the prompt cache), with traced positions; decoding's
few queries read the caches with `cached_attention`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

f32 = jnp.float32


def _blocks(length: int, min_block: int, max_blocks: int) -> list[tuple[int, int]]:
    size = max(min_block, -(-length // max_blocks))
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _head_major(q, k, v):
    """[b l h d] -> q: [b g l*r d] (row = position * r + head-in-group), k and v: [b g l d]."""
    b, length, h, d = q.shape
    g = k.shape[2]
    qh = q.reshape(b, length, g, h // g, d).transpose(0, 2, 1, 3, 4).reshape(b, g, length * (h // g), d)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _scores(q_blk, k, start, r, scale, segment_ids=None):
    """Scaled fp32 scores of one query block against its key prefix, future keys (and keys of other
    documents, given `segment_ids` [b, l]) masked out."""
    s = jnp.einsum("bgmd,bgkd->bgmk", q_blk, k, preferred_element_type=f32) * scale
    q_pos = start + jnp.arange(q_blk.shape[2])[:, None] // r
    visible = q_pos >= jnp.arange(k.shape[2])[None, :]
    if segment_ids is not None:
        same = segment_ids[:, q_pos[:, 0], None] == segment_ids[:, None, :k.shape[2]]  # [b m k]
        visible = visible & same[:, None]
    return jnp.where(visible, s, -jnp.inf)


def _forward(q, k, v, segment_ids, min_block, max_blocks):
    b, length, h, d = q.shape
    g = k.shape[2]
    r = h // g
    qh, kh, vh = _head_major(q, k, v)
    scale = 1.0 / math.sqrt(d)
    outs, lses = [], []
    for start, end in _blocks(length, min_block, max_blocks):
        s = _scores(qh[:, :, start * r:end * r], kh[:, :, :end], start, r, scale, segment_ids)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bgmk,bgkd->bgmd", p.astype(v.dtype), vh[:, :, :end], preferred_element_type=f32)
        outs.append(o / denom)
        lses.append((m + jnp.log(denom))[..., 0])
    out = jnp.concatenate(outs, axis=2).reshape(b, g, length, r, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, length, h, d).astype(q.dtype), jnp.concatenate(lses, axis=-1)


def causal_attention(q: Float[Array, "b l h d"], k: Float[Array, "b l g d"], v: Float[Array, "b l g d"],
                     segment_ids: Int[Array, "b l"] | None = None, min_block: int = 64, max_blocks: int = 32
                     ) -> Float[Array, "b l h d"]:
    """softmax(q k^T / sqrt(d) + causal mask) v, with h query heads sharing g = h / r key/value heads;
    with `segment_ids` (packed documents) a query sees only its own document's keys."""
    return _causal_attention(q, k, v, segment_ids, min_block, max_blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal_attention(q, k, v, segment_ids, min_block, max_blocks):
    return _forward(q, k, v, segment_ids, min_block, max_blocks)[0]


def _fwd(q, k, v, segment_ids, min_block, max_blocks):
    out, lse = _forward(q, k, v, segment_ids, min_block, max_blocks)
    return out, (q, k, v, segment_ids, out, lse)


def _bwd(min_block, max_blocks, res, d_out):
    q, k, v, segment_ids, out, lse = res
    b, length, h, d = q.shape
    g = k.shape[2]
    r = h // g
    scale = 1.0 / math.sqrt(d)
    qh, kh, vh = _head_major(q, k, v)
    do = _head_major(d_out, k, v)[0]
    delta = jnp.sum(do.astype(f32) * _head_major(out, k, v)[0].astype(f32), axis=-1)  # [b g l*r]
    dq_blocks = []
    dk = jnp.zeros(kh.shape, f32)
    dv = jnp.zeros(vh.shape, f32)
    for start, end in _blocks(length, min_block, max_blocks):
        rows = slice(start * r, end * r)
        q_blk, do_blk = qh[:, :, rows], do[:, :, rows]
        p = jnp.exp(_scores(q_blk, kh[:, :, :end], start, r, scale, segment_ids) - lse[..., rows, None])
        dv = dv.at[:, :, :end].add(jnp.einsum("bgmk,bgmd->bgkd", p.astype(do.dtype), do_blk,
                                              preferred_element_type=f32))
        dp = jnp.einsum("bgmd,bgkd->bgmk", do_blk, vh[:, :, :end], preferred_element_type=f32)
        ds = (p * (dp - delta[..., rows, None]) * scale).astype(q.dtype)
        dq_blocks.append(jnp.einsum("bgmk,bgkd->bgmd", ds, kh[:, :, :end], preferred_element_type=f32))
        dk = dk.at[:, :, :end].add(jnp.einsum("bgmk,bgmd->bgkd", ds, q_blk, preferred_element_type=f32))
    dq = jnp.concatenate(dq_blocks, axis=2).reshape(b, g, length, r, d).transpose(0, 2, 1, 3, 4)
    return (dq.reshape(q.shape).astype(q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
            dv.transpose(0, 2, 1, 3).astype(v.dtype), None)


_causal_attention.defvjp(_fwd, _bwd)


def cached_attention(q: Float[Array, "b t h d"], keys: Sequence[Float[Array, "b g s d"]],
                     values: Sequence[Float[Array, "b g s d"]], counts: Sequence[Int[Array, "b t"]]
                     ) -> Float[Array, "b t h d"]:
    """t queries per row against cached keys kept in several parts (the prompt's, the new tokens'):
    query i of row b reads the first `counts[j][b, i]` entries of part j, all parts in one fp32 softmax
    (decoding: one query per row, or a speculative draft's t)."""
    b, t, h, d = q.shape
    g = keys[0].shape[1]
    qg = q.reshape(b, t, g, h // g, d)
    scores = [jnp.where(jnp.arange(k.shape[2]) < n[:, :, None, None, None],
                        jnp.einsum("bqgrd,bgsd->bqgrs", qg, k, preferred_element_type=f32) / math.sqrt(d), -jnp.inf)
              for k, n in zip(keys, counts)]
    p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for v in values:
        part = jax.lax.slice_in_dim(p, start, start + v.shape[2], axis=4)
        out = out + jnp.einsum("bqgrs,bgsd->bqgrd", part.astype(v.dtype), v, preferred_element_type=f32)
        start += v.shape[2]
    return out.reshape(b, t, h, d).astype(q.dtype)


def attention_at(q: Float[Array, "b l h d"], keys: Float[Array, "b s g d"], values: Float[Array, "b s g d"],
                 start: Int[Array, ""] | int,
                 segments: tuple[Int[Array, "b l"], Int[Array, "b s"]] | None = None, block: int = 128
                 ) -> Float[Array, "b l h d"]:
    """Causal GQA attention of l queries at positions start, ..., start + l - 1 against the keys and values
    of positions 0, ..., s - 1: key j is seen by the query at position i when j <= i (and, given
    `segments` = (the queries' segment ids, the keys'), when both are in one document). A sequence
    shard's queries against all-gathered keys, or a prefill chunk's against the prompt cache.

    Flash-style: blocks of queries, an online softmax over blocks of keys, and a backward that
    recomputes each tile from the saved log-sum-exps, so memory is O(block^2), not O(l s)."""
    b, length, h, d = q.shape
    total, g = keys.shape[1], keys.shape[2]
    q_seg, k_seg = segments if segments is not None else (jnp.zeros((b, length), jnp.int32),
                                                           jnp.zeros((b, total), jnp.int32))
    q_block, k_block = min(block, length), min(block, total)
    pad_q, pad_k = -length % q_block, -total % k_block
    qg = jnp.pad(q, [(0, 0), (0, pad_q), (0, 0), (0, 0)]).reshape(b, -1, q_block, g, h // g, d)
    kb, vb = (jnp.pad(t, [(0, 0), (0, pad_k), (0, 0), (0, 0)]).reshape(b, -1, k_block, g, d) for t in (keys, values))
    q_pos = (start + jnp.arange(length + pad_q)).reshape(-1, q_block)
    k_pos = jnp.arange(total + pad_k)
    k_pos = jnp.where(k_pos < total, k_pos, jnp.iinfo(jnp.int32).max).reshape(-1, k_block)  # padding: never seen
    q_seg = jnp.pad(q_seg, [(0, 0), (0, pad_q)]).reshape(b, -1, q_block)
    k_seg = jnp.pad(k_seg, [(0, 0), (0, pad_k)]).reshape(b, -1, k_block)
    out = _flash(qg, kb, vb, q_pos, k_pos, q_seg, k_seg)  # [blocks b g r q d]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, -1, h, d)[:, :length].astype(q.dtype)


def _tile_scores(qi, kj, q_pos, k_pos, q_seg, k_seg):
    """[b g r q k] scores of a (scaled) query block against a key block, masked by position and document."""
    s = jnp.einsum("bqgrd,bkgd->bgrqk", qi, kj.astype(f32))
    visible = (k_pos[None, :] <= q_pos[:, None])[None] & (q_seg[:, :, None] == k_seg[:, None, :])  # [b q k]
    return jnp.where(visible[:, None, None], s, -jnp.inf)


def _finite(t):
    return jnp.where(jnp.isfinite(t), t, 0.0)


@jax.custom_vjp
def _flash(qg, kb, vb, q_pos, k_pos, q_seg, k_seg):
    return _flash_forward(qg, kb, vb, q_pos, k_pos, q_seg, k_seg)[0]


def _flash_forward(qg, kb, vb, q_pos, k_pos, q_seg, k_seg):
    """Per query block an online softmax over the key blocks: (outputs, log-sum-exps)."""
    scale = 1.0 / math.sqrt(qg.shape[-1])
    b, _, q_block, g, r, d = qg.shape

    def query_block(i):
        qi = qg[:, i].astype(f32) * scale

        def key_block(carry, j):
            top, denom, acc = carry
            s = _tile_scores(qi, kb[:, j], q_pos[i], k_pos[j], q_seg[:, i], k_seg[:, j])
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            p = jnp.exp(s - _finite(new_top)[..., None])
            rescale = jnp.exp(_finite(top) - _finite(new_top))
            acc = acc * rescale[..., None] + jnp.einsum("bgrqk,bkgd->bgrqd", p, vb[:, j].astype(f32))
            return (new_top, denom * rescale + jnp.sum(p, axis=-1), acc), None

        shape = (b, g, r, q_block)
        init = (jnp.full(shape, -jnp.inf, f32), jnp.zeros(shape, f32), jnp.zeros((*shape, d), f32))
        (top, denom, acc), _ = jax.lax.scan(key_block, init, jnp.arange(kb.shape[1]))
        return acc / jnp.maximum(denom, 1e-30)[..., None], _finite(top) + jnp.log(jnp.maximum(denom, 1e-30))

    return jax.lax.map(query_block, jnp.arange(qg.shape[1]))


def _flash_fwd(qg, kb, vb, q_pos, k_pos, q_seg, k_seg):
    out, lse = _flash_forward(qg, kb, vb, q_pos, k_pos, q_seg, k_seg)
    return out, (qg, kb, vb, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(res, d_out):
    """Flash attention's backward: probabilities recomputed from the saved log-sum-exps, one (query block,
    key block) tile at a time; key and value gradients accumulate over the query blocks."""
    qg, kb, vb, q_pos, k_pos, q_seg, k_seg, out, lse = res
    scale = 1.0 / math.sqrt(qg.shape[-1])

    def query_block(carry, i):
        dk, dv = carry
        qi, do = qg[:, i].astype(f32) * scale, d_out[i].astype(f32)
        delta = jnp.sum(do * out[i], axis=-1)  # [b g r q]

        def key_block(dq, j):
            p = jnp.exp(_tile_scores(qi, kb[:, j], q_pos[i], k_pos[j], q_seg[:, i], k_seg[:, j]) - lse[i][..., None])
            dp = jnp.einsum("bgrqd,bkgd->bgrqk", do, vb[:, j].astype(f32))
            ds = p * (dp - delta[..., None])
            dq = dq + jnp.einsum("bgrqk,bkgd->bqgrd", ds, kb[:, j].astype(f32)) * scale
            return dq, (jnp.einsum("bgrqk,bqgrd->bkgd", ds, qi), jnp.einsum("bgrqk,bgrqd->bkgd", p, do))

        dq, (dk_i, dv_i) = jax.lax.scan(key_block, jnp.zeros(qi.shape, f32), jnp.arange(kb.shape[1]))
        return (dk + jnp.moveaxis(dk_i, 0, 1), dv + jnp.moveaxis(dv_i, 0, 1)), dq

    zeros = jnp.zeros(kb.shape, f32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(qg.shape[1]))
    return (jnp.moveaxis(dq, 0, 1).astype(qg.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype),
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
