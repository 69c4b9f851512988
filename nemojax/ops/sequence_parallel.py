"""The sequence mixers' ops with the time axis split over a mesh axis (context parallelism), called inside
`shard_map` on each device's contiguous span of the sequence.

- SSD scan (`ssd_sequence_sharded`): the recurrence is linear in its state, so each shard scans its own
  span from a zero state (`ops/ssd.py`), then the shards exchange their final states and the decay across
  their whole span (an all-gather of [b, h, p, n] + [b, h] per shard); a scan over the shards gives the
  state entering each, and each shard adds that state's read-out, decayed to each position, to its
  outputs. Exact up to fp32 rounding; the backward is autodiff of the same steps (the all-gather's
  transpose sends the state cotangents back to the shards that produced them).
- Depthwise causal conv (`conv_sequence_sharded`): each shard takes the last K - 1 inputs of the previous
  one (a ppermute halo) and drops their outputs.
- Attention (`attention_sequence_sharded`): keys and values are all-gathered over the axis (a hybrid has few
  attention layers, and GQA's few KV heads make them small); each shard's queries attend with the causal
  mask of their global positions (`ops/attention.py::attention_at`, flash-style).

With packed documents (`segment_ids`, non-decreasing per row), the entering state reaches only the
positions still in the document the previous shard ended in, and a shard holding a document start passes
nothing from before it on.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.ops.attention import attention_at
from nemojax.ops.conv import causal_conv1d_silu
from nemojax.ops.ssd import ssd_chunked

f32 = jnp.float32


def _previous_shards_last(t: jax.Array, axis: str) -> jax.Array:
    """The previous shard's value of `t`'s last time step (zeros on the first shard)."""
    shards = jax.lax.axis_size(axis)
    return jax.lax.ppermute(t[:, -1], axis, [(i, i + 1) for i in range(shards - 1)])


def ssd_sequence_sharded(x: Float[Array, "b l h p"], dt: Float[Array, "b l h"], A: Float[Array, " h"],
                         B: Float[Array, "b l g n"], C: Float[Array, "b l g n"], chunk_size: int,
                         D: Float[Array, " h"] | None = None, segment_ids: Int[Array, "b l"] | None = None,
                         axis: str = "sequence", local_scan: Callable = ssd_chunked
                         ) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """`ssd_chunked` over a sequence split on mesh axis `axis` (this shard's span; the final state
    returned is the whole sequence's, on every shard). `local_scan`: the span's own scan from a zero
    state (`ssd_chunked`, or the Pallas `ssd` with the same signature)."""
    kwargs = {} if segment_ids is None else {"segment_ids": segment_ids}
    y, local_final = local_scan(x, dt, A, B, C, chunk_size, D=D, **kwargs)
    y = y.astype(f32)
    log_decay = jnp.cumsum(dt.astype(f32) * A.astype(f32), axis=1)  # [b l h]: decay from the span's start
    if segment_ids is None:
        continuing = jnp.ones(dt.shape[:2], bool)
    else:  # positions still in the document the previous shard ended in
        first = jax.lax.axis_index(axis) == 0
        continuing = (segment_ids == _previous_shards_last(segment_ids, axis)[:, None]) & ~first
    span_decay = jnp.exp(log_decay[:, -1]) * jnp.all(continuing, axis=1)[:, None]  # [b h]
    states, decays = jax.lax.all_gather(local_final, axis), jax.lax.all_gather(span_decay, axis)
    entering = [jnp.zeros_like(local_final)]
    for i in range(1, states.shape[0]):  # state entering shard i
        entering.append(decays[i - 1][..., None, None] * entering[-1] + states[i - 1])
    entering = jnp.stack(entering)
    mine = entering[jax.lax.axis_index(axis)]  # [b h p n]
    heads, groups = x.shape[2], B.shape[2]
    C_heads = jnp.repeat(C.astype(f32), heads // groups, axis=2)  # [b l h n]
    reach = jnp.exp(log_decay) * continuing[..., None]  # [b l h]
    y = y + reach[..., None] * jnp.einsum("bhpn,blhn->blhp", mine, C_heads)
    final = states[-1] + decays[-1][..., None, None] * entering[-1]
    return y, final


def conv_sequence_sharded(x: Float[Array, "b l *c"], weight: Float[Array, "k *c"], bias: Float[Array, "*c"],
                          segment_ids: Int[Array, "b l"] | None = None, axis: str = "sequence"
                          ) -> Float[Array, "b l *c"]:
    """`causal_conv1d_silu` over a sequence split on mesh axis `axis` (each span at least K - 1 long)."""
    halo = weight.shape[0] - 1
    shards = jax.lax.axis_size(axis)
    pairs = [(i, i + 1) for i in range(shards - 1)]
    before = jax.lax.ppermute(x[:, x.shape[1] - halo:], axis, pairs)  # zeros on the first shard
    extended = jnp.concatenate([before, x], axis=1)
    if segment_ids is not None:
        segment_ids = jnp.concatenate([jax.lax.ppermute(segment_ids[:, segment_ids.shape[1] - halo:], axis, pairs),
                                       segment_ids], axis=1)
    return causal_conv1d_silu(extended, weight, bias, segment_ids)[:, halo:]


def attention_sequence_sharded(q: Float[Array, "b l h d"], k: Float[Array, "b l g d"], v: Float[Array, "b l g d"],
                               segment_ids: Int[Array, "b l"] | None = None, axis: str = "sequence",
                               block: int = 128) -> Float[Array, "b l h d"]:
    """Causal GQA attention over a sequence split on mesh axis `axis` (this shard's queries, keys and
    values): softmax(q k^T / sqrt(d)) v with the mask of global positions (and of documents)."""
    keys, values = (jax.lax.all_gather(t, axis, axis=1, tiled=True) for t in (k, v))  # [b L g d]
    segments = None
    if segment_ids is not None:
        segments = (segment_ids, jax.lax.all_gather(segment_ids, axis, axis=1, tiled=True))
    return attention_at(q, keys, values, jax.lax.axis_index(axis) * q.shape[1], segments, block)
