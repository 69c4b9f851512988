"""The Mamba-2 SSD (state space duality) scan in pure JAX.

Recurrence, per head h (state S of shape [head_dim, state]):
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T,      y_t = S_t C_t + D * x_t.

`ssd_chunked` evaluates it in chunks of Q tokens: inside a chunk as a masked (Q x Q) "attention"
product, across chunks through the chunk-final states, combined with `jax.lax.associative_scan`.
Memory is O(L * Q) per head, never O(L^2). `ssd_step` advances one token (decoding);
The tests' token-by-token reference (`tests/reference.py::ssd_sequential`) is built from it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.ops.platform import on_cpu
from nemojax.ops.sums import sum_last, sum_leading

f32 = jnp.float32


def ssd_chunked(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, " h"],
    B: Float[Array, "b l g n"],
    C: Float[Array, "b l g n"],
    chunk_size: int,
    D: Float[Array, " h"] | None = None,
    initial_state: Float[Array, "b h p n"] | None = None,
    segment_ids: Int[Array, "b l"] | None = None,
) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """Chunked SSD scan. `dt` is already discretised (softplus, clamp). Returns (y in fp32, final state).

    `segment_ids` (non-decreasing per row: packed documents) restarts the recurrence at every document
    start, so each document's outputs are what it gets alone; `initial_state` then belongs to the first
    document and the final state to the last.

    The backward is written by hand (`_ssd_bwd`): it recomputes the chunk-local (Q x Q) decays
    instead of storing them and avoids the layout shuffles XLA's autodiff of the einsums inserts.
    """
    b, _, h, p = x.shape
    n = B.shape[-1]
    D = jnp.zeros((h,), f32) if D is None else D
    init = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state
    return _ssd(x, dt, A, B, C, D, init, segment_ids, chunk_size)


def _pad_time(t: jax.Array, q: int) -> jax.Array:
    """fp32, time (axis 1) padded to whole chunks. Padded steps get dt = 0 (and x = 0): no decay and no
    input, so they change neither outputs nor the final state."""
    return jnp.pad(t.astype(f32), [(0, 0), (0, -t.shape[1] % q)] + [(0, 0)] * (t.ndim - 2))


def _chunk_heads(t: jax.Array, q: int, g: int) -> jax.Array:
    """[b l h] -> [b c g r q] or [b l h p] -> [b c g r q p]: heads split into groups, chunk-major."""
    t = _pad_time(t, q)
    b, padded, h = t.shape[:3]
    t = t.reshape(b, padded // q, q, g, h // g, *t.shape[3:])
    return jnp.moveaxis(t, 2, 4)


def _chunk_groups(t: jax.Array, q: int) -> jax.Array:
    """[b l g n] -> [b c g q n]."""
    t = _pad_time(t, q)
    b, padded = t.shape[:2]
    return t.reshape(b, padded // q, q, *t.shape[2:]).transpose(0, 1, 3, 2, 4)


def _unchunk_heads(t: jax.Array, length: int) -> jax.Array:
    """[b c g r q ...] -> [b l h ...], cropping the padding."""
    b, c, g, r, q = t.shape[:5]
    return jnp.moveaxis(t, 4, 2).reshape(b, c * q, g * r, *t.shape[5:])[:, :length]


def _decay(s: jax.Array) -> jax.Array:
    """L[i, j] = exp(s_i - s_j) for i >= j, else 0; s is the in-chunk cumulative log-decay [..., q]."""
    q = s.shape[-1]
    causal = jnp.tril(jnp.ones((q, q), dtype=bool))
    return jnp.exp(jnp.where(causal, s[..., :, None] - s[..., None, :], -jnp.inf))


def _linear_scan(decay: jax.Array, inputs: jax.Array, first: jax.Array) -> jax.Array:
    """S_c = decay_c * S_{c-1} + inputs_c over axis 1 with S_{-1} = first, via an associative scan."""
    inputs = inputs.at[:, 0].add(decay[:, 0, ..., None, None] * first)

    def combine(left, right):
        return left[0] * right[0], right[0][..., None, None] * left[1] + right[1]

    return jax.lax.associative_scan(combine, (decay, inputs), axis=1)[1]


def _chunked_inputs(x, dt, A, B, C, q):
    g = B.shape[2]
    xc, dtc = _chunk_heads(x, q, g), _chunk_heads(dt, q, g)
    Bc, Cc = _chunk_groups(B, q), _chunk_groups(C, q)
    a = dtc * A.astype(f32).reshape(g, -1)[:, :, None]
    return xc, dtc, Bc, Cc, on_cpu(_cumsum_as_product, lambda t: jnp.cumsum(t, axis=-1))(a)  # s: [b c g r q]


class _SegmentMasks(NamedTuple):
    """Where packed documents cut the recurrence, per chunk (1.0: connected, 0.0: cut), shaped to
    broadcast against [b c g r ...]."""

    same: jax.Array  # [b c 1 1 q q]: positions i and j are in one document (the in-chunk product)
    to_end: jax.Array  # [b c 1 1 q]: position j is in the chunk's last document (its state leaves the chunk)
    from_start: jax.Array  # [b c 1 1 q]: position i is in the document entering the chunk (reads its state)
    carried: jax.Array  # [b c 1 1]: the entering state survives the whole chunk (no document starts in it)


def _segment_masks(segment_ids: jax.Array | None, q: int) -> _SegmentMasks | None:
    if segment_ids is None:
        return None
    seg = jnp.pad(segment_ids, [(0, 0), (0, -segment_ids.shape[1] % q)], mode="edge")  # padding joins the last
    seg = seg.reshape(seg.shape[0], -1, q)  # [b c q]
    end = seg[..., -1]
    entering = jnp.concatenate([seg[:, :1, 0], end[:, :-1]], axis=1)  # the first document owns the initial state
    as_f32 = lambda m: m.astype(f32)[:, :, None, None]  # noqa: E731
    return _SegmentMasks(as_f32(seg[..., :, None] == seg[..., None, :]), as_f32(seg == end[..., None]),
                         as_f32(seg == entering[..., None]), as_f32(entering == end))


def _cumsum_as_product(a: jax.Array) -> jax.Array:
    """The in-chunk cumsum as a product with a triangular matrix: a materialised result, where XLA:CPU
    would otherwise fuse its blocked cumsum into every (Q x Q) consumer and stop vectorising them."""
    q = a.shape[-1]
    return jnp.einsum("...j,ji->...i", a, jnp.triu(jnp.ones((q, q), f32)))


def _ssd_forward(x, dt, A, B, C, D, init, segment_ids, q):
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    xc, dtc, Bc, Cc, s = _chunked_inputs(x, dt, A, B, C, q)
    cut = _segment_masks(segment_ids, q)
    X = xc * dtc[..., None]
    scores = jnp.einsum("bcgin,bcgjn->bcgij", Cc, Bc)
    decay = _decay(s) if cut is None else _decay(s) * cut.same
    M = scores[:, :, :, None] * decay
    y = jnp.einsum("bcgrij,bcgrjp->bcgrip", M, X)  # within chunks
    s_end = s[..., -1]
    to_end = jnp.exp(s_end[..., None] - s) if cut is None else jnp.exp(s_end[..., None] - s) * cut.to_end
    states = jnp.einsum("bcgjn,bcgrjp->bcgrpn", Bc, X * to_end[..., None])
    chunk_decay = jnp.exp(s_end) if cut is None else jnp.exp(s_end) * cut.carried
    ends = _linear_scan(chunk_decay, states, init.astype(f32).reshape(b, g, h // g, p, n))
    entering = jnp.concatenate([init.astype(f32).reshape(b, 1, g, h // g, p, n), ends[:, :-1]], axis=1)
    readout = jnp.exp(s) if cut is None else jnp.exp(s) * cut.from_start
    y = y + jnp.einsum("bcgin,bcgrpn->bcgrip", Cc, entering) * readout[..., None]  # from earlier chunks
    y_skip = _unchunk_heads(y, length) + D.astype(f32)[:, None] * x.astype(f32)
    return y_skip, ends[:, -1].reshape(b, h, p, n), (entering, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _ssd(x, dt, A, B, C, D, init, segment_ids, chunk_size):
    y, final, _ = _ssd_forward(x, dt, A, B, C, D, init, segment_ids, chunk_size)
    return y, final


def _ssd_fwd(x, dt, A, B, C, D, init, segment_ids, chunk_size):
    y, final, saved = _ssd_forward(x, dt, A, B, C, D, init, segment_ids, chunk_size)
    return (y, final), (x, dt, A, B, C, D, init, segment_ids, saved)


def _ssd_bwd(q, res, cotangents):
    x, dt, A, B, C, D, init, segment_ids, (entering, yc) = res
    dy, d_final = cotangents
    cut = _segment_masks(segment_ids, q)
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    xc, dtc, Bc, Cc, s = _chunked_inputs(x, dt, A, B, C, q)
    dyc = _chunk_heads(dy, q, g)
    X = xc * dtc[..., None]
    s_exp = jnp.exp(s) if cut is None else jnp.exp(s) * cut.from_start  # the read-out's decay
    s_end = s[..., -1]
    to_end = jnp.exp(s_end[..., None] - s) if cut is None else jnp.exp(s_end[..., None] - s) * cut.to_end

    decay = _decay(s) if cut is None else _decay(s) * cut.same
    M = jnp.einsum("bcgin,bcgjn->bcgij", Cc, Bc)[:, :, :, None] * decay
    # Within chunks: y_i = sum_j M_ij X_j with M = (C B^T) * decay, decay_ij = exp(s_i - s_j).
    dX = jnp.einsum("bcgrij,bcgrip->bcgrjp", M, dyc)
    dM = jnp.einsum("bcgrip,bcgrjp->bcgrij", dyc, X)
    d_scores = sum(dM[:, :, :, k] * decay[:, :, :, k] for k in range(r))  # over the heads sharing B and C
    # d(decay_ij) decay_ij = dM_ij M_ij enters s_i with + and s_j with -. Its row sums are
    # <dy_i, (M X)_i> and its column sums <X_j, dX_j>: no (Q x Q) pass. The read-out term below,
    # exp(s_i) C_i . E_c, adds <dy_i, its value> to ds_i too, so one product with the chunked y covers both.
    ds = sum_last(dyc * yc) - sum_last(X * dX)
    dC = jnp.einsum("bcgij,bcgjn->bcgin", d_scores, Bc)
    dB = jnp.einsum("bcgij,bcgin->bcgjn", d_scores, Cc)

    # Read-out of the entering state: y_i += exp(s_i) C_i . E_c.
    d_readout = dyc * s_exp[..., None]
    dC = dC + jnp.einsum("bcgrip,bcgrpn->bcgin", d_readout, entering)
    d_entering = jnp.einsum("bcgrip,bcgin->bcgrpn", d_readout, Cc)

    # Across chunks, in reverse: T_c = dE_c + exp(s_end_c) T_{c+1}, T_C = d_final.
    chunk_decay = jnp.exp(s_end) if cut is None else jnp.exp(s_end) * cut.carried
    d_final = d_final.astype(f32).reshape(b, g, r, p, n)
    totals = jnp.flip(_linear_scan(jnp.flip(chunk_decay, 1), jnp.flip(d_entering, 1), d_final), 1)
    d_states = jnp.concatenate([totals[:, 1:], d_final[:, None]], axis=1)  # cotangent of each chunk's state
    d_init = totals[:, 0]
    ds_end = jnp.sum(d_states * entering, axis=(-2, -1)) * chunk_decay

    # Chunk states: H_c = sum_j B_j (exp(s_end - s_j) X_j).
    dHB = jnp.einsum("bcgrpn,bcgjn->bcgrjp", d_states, Bc)
    dX = dX + dHB * to_end[..., None]
    dB = dB + jnp.einsum("bcgrjp,bcgrpn->bcgjn", X * to_end[..., None], d_states)
    d_to_end = sum_last(X * dHB) * to_end
    ds = ds - d_to_end
    ds_end = ds_end + jnp.sum(d_to_end, axis=-1)
    ds = ds.at[..., -1].add(ds_end)

    # s = cumsum(dt * A); X = x * dt.
    da = jnp.flip(jnp.cumsum(jnp.flip(ds, -1), axis=-1), -1)
    A_gr = A.astype(f32).reshape(g, r)[:, :, None]
    dxc = dX * dtc[..., None]
    ddtc = sum_last(dX * xc) + da * A_gr
    dA = jnp.sum(da * dtc, axis=(0, 1, 4)).reshape(h)

    dy32 = dy.astype(f32)
    dx = _unchunk_heads(dxc, length) + D.astype(f32)[:, None] * dy32
    ddt = _unchunk_heads(ddtc, length)
    dB = dB.transpose(0, 1, 3, 2, 4).reshape(b, -1, g, n)[:, :length]
    dC = dC.transpose(0, 1, 3, 2, 4).reshape(b, -1, g, n)[:, :length]
    dD = jnp.sum(sum_leading(dy32 * x.astype(f32), 2), axis=-1)
    return (dx.astype(x.dtype), ddt.astype(dt.dtype), dA.astype(A.dtype), dB.astype(B.dtype),
            dC.astype(C.dtype), dD.astype(D.dtype), d_init.reshape(init.shape).astype(init.dtype), None)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_step(
    state: Float[Array, "b h p n"],
    x: Float[Array, "b h p"],
    dt: Float[Array, "b h"],
    A: Float[Array, " h"],
    B: Float[Array, "b g n"],
    C: Float[Array, "b g n"],
    D: Float[Array, " h"] | None = None,
) -> tuple[Float[Array, "b h p"], Float[Array, "b h p n"]]:
    """One token of the recurrence (decoding): (y in fp32, next state). Cost independent of context."""
    r = x.shape[1] // B.shape[1]
    x32, dt32 = x.astype(f32), dt.astype(f32)
    B_h, C_h = (jnp.repeat(t.astype(f32), r, axis=1) for t in (B, C))  # head i reads group i // r
    state = (jnp.exp(dt32 * A.astype(f32))[..., None, None] * state.astype(f32)
             + (dt32[..., None] * x32)[..., None] * B_h[:, :, None, :])
    y = jnp.einsum("bhpn,bhn->bhp", state, C_h)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x32
    return y, state
