"""Mamba-2 SSD scan for TPUs (Pallas on Mosaic): one grid step per (batch, head, chunk), chunks last.

The chunk is the last, sequential ("arbitrary") grid axis and the running [head_dim, state] state lives
in VMEM scratch: per chunk the kernel fuses the intra-chunk (Q x Q) product, the read-out of the entering
state and the state update, so only x, dt, B, C go in and y goes out. Inputs are made head-major so each
block is a (chunk, width) tile. The backward walks the chunks in reverse with the state's cotangent in
scratch; the entering states it needs come from a states-only pass of the forward kernel.
`GridPlan.on_chip` estimates what a grid step holds in VMEM (checked by `pallas/budget.py`). On the CPU the
kernels run with `interpret=True`. All accumulation is fp32; x, B, C may be bf16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas import budget
from pallas.ssd_common import DOCUMENT_RESET, pad

f32 = jnp.float32


def ssd_grid_kernels(x, dt, A, B, C, init, starts, plan: "GridPlan"):
    """(y in fp32 without the D term, final state): `pallas.ssd.ssd`'s TPU path with an explicit plan;
    `starts` [b, l] marks packed documents' first positions (`ssd_common.document_starts`)."""
    return _ssd(x, dt, A, B, C, init, starts, plan)


# ----- static plan: chunking, padding, layouts and block specs ----------------------------------------


def _vmem_tile(rows: int, cols: int, itemsize: int) -> int:
    """Bytes of a [rows, cols] VMEM buffer: Mosaic pads the lanes (last axis) to 128 and the sublanes to
    8 rows of 32 bits (16 for 16-bit types)."""
    sublanes = 8 * (4 // itemsize)
    return -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * itemsize


@dataclasses.dataclass(frozen=True)
class GridPlan:
    """Static choices of one call (hashable: it is a non-differentiable argument of the custom VJP)."""

    chunk: int
    head_dim: int
    state: int
    dtype: str  # of x, B, C
    interpret: bool
    devices = budget.TPU_SCOPED_VMEM  # where `on_chip` must fit

    def on_chip(self) -> dict[str, int]:
        """Bytes one grid step holds in VMEM: its blocks, double-buffered by the pipeline, the state
        scratch, and the fp32 (Q x Q) and (Q x width) values the per-chunk math keeps live at once."""
        q, p, n, item = self.chunk, self.head_dim, self.state, jnp.dtype(self.dtype).itemsize
        seq, col, st = _vmem_tile(q, p, item), _vmem_tile(q, 1, 4), _vmem_tile(p, n, 4)
        bc = _vmem_tile(q, n, item)
        square, seq32, bc32 = _vmem_tile(q, q, 4), _vmem_tile(q, p, 4), _vmem_tile(q, n, 4)
        forward = 2 * (seq + 2 * col + 2 * bc + st + seq32 + st) + st + 4 * square + 3 * seq32
        backward = (2 * (seq + 2 * col + 2 * bc + st + seq32 + st + seq32 + 2 * col + 2 * bc32 + st) + st
                    + 6 * square + 5 * seq32 + 4 * bc32)
        return {"forward": forward, "backward": backward}

    # Sequence arrays are [b, h|g, L, width] (heads or groups in front of time); dt and dt * A have a unit
    # width: a column per chunk. States are [b, h, p, n].
    @staticmethod
    def to_layout(t: jax.Array) -> jax.Array:
        return jnp.moveaxis(t, 2, 1)

    @staticmethod
    def from_layout(t: jax.Array) -> jax.Array:
        return jnp.moveaxis(t, 1, 2)

    @staticmethod
    def layout_struct(*shape: int) -> jax.ShapeDtypeStruct:
        """An fp32 kernel output whose natural shape is `shape`."""
        return jax.ShapeDtypeStruct((shape[0], shape[2], shape[1], *shape[3:]), f32)

    @staticmethod
    def grid(b: int, h: int, n_chunks: int) -> tuple[int, ...]:
        return (b, h, n_chunks)

    def seq_spec(self, length: int, width: int, heads_per_row: int = 1, reverse: bool = False):
        """x, dt, y, B, C and their cotangents; `heads_per_row` > 1 maps a head to its group."""
        chunk = _chunk_index(length // self.chunk, reverse)
        return pl.BlockSpec((None, None, self.chunk, width), lambda i, j, c: (i, j // heads_per_row, chunk(c), 0))

    @staticmethod
    def state_spec(p: int, n: int):
        """One [p, n] state per (batch, head): initial, final and their cotangents."""
        return pl.BlockSpec((None, None, p, n), lambda i, j, c: (i, j, 0, 0))

    def states_spec(self, n_chunks: int, p: int, n: int, reverse: bool = False):
        """The state entering every chunk, [b, h, chunks, p, n]."""
        chunk = _chunk_index(n_chunks, reverse)
        return pl.BlockSpec((None, None, None, p, n), lambda i, j, c: (i, j, chunk(c), 0, 0))

    def call(self, kernel, grid, in_specs, out_specs, out_shape, scratch_p_n):
        """`pallas_call` with the carried state as VMEM scratch; chunks are the sequential axis."""
        from jax.experimental.pallas import tpu as pltpu

        kwargs = {}
        if not self.interpret:
            kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              scratch_shapes=[pltpu.VMEM(scratch_p_n, f32)], interpret=self.interpret, **kwargs)


def _chunk_index(n_chunks: int, reverse: bool):
    return (lambda c: n_chunks - 1 - c) if reverse else (lambda c: c)


def _walk(n_chunks: int, carry_init: jax.Array, body, scratch) -> jax.Array:
    """One chunk per grid step: `body(carry) -> carry` with the carry in VMEM scratch, started at the first
    step; returns the carry after this step."""
    (state_ref,) = scratch

    @pl.when(pl.program_id(2) == 0)
    def _():
        state_ref[...] = carry_init

    state_ref[...] = body(state_ref[...])
    return state_ref[...]


def _store_at_last_step(n_chunks: int, ref, value) -> None:
    @pl.when(pl.program_id(2) == n_chunks - 1)
    def _():
        ref[...] = value


# ----- per-chunk math (fp32 values of one chunk of one head) ------------------------------------------


def _mm(a, b, transpose_a=False, transpose_b=False):
    dims = ((0 if transpose_a else 1,), (1 if transpose_b else 0,))
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=f32)


def _masks(q: int):
    """(i >= j, i <= j, i == j) over a chunk's (q x q) positions."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    return rows >= cols, rows <= cols, rows == cols


def _to_row(v, eye):
    """[q, 1] -> [1, q] as a masked reduction (no transpose op, which not every backend lowers)."""
    return jnp.sum(jnp.where(eye, v, 0.0), axis=0, keepdims=True)


def _decays(a, masks):
    """From the per-step log-decays a = dt * A [q, 1]: their in-chunk cumulative sum s [q, 1], the
    masked (q x q) decay matrix exp(s_i - s_j), and the chunk's total s_end."""
    causal, upper, eye = masks
    s_col = jnp.sum(jnp.where(causal, _to_row(a, eye), 0.0), axis=1, keepdims=True)
    s_row = jnp.sum(jnp.where(upper, a, 0.0), axis=0, keepdims=True)
    decay = jnp.exp(jnp.where(causal, s_col - s_row, -jnp.inf))
    return s_col, decay, jnp.sum(a)


def _chunk_forward(x, dt, a, Bm, Cm, state, masks, with_output: bool):
    """y of the chunk (or None) and the state after it. x [q,p], dt/a [q,1], B/C [q,n], state [p,n]."""
    s, decay, total = _decays(a, masks)
    X = x * dt
    new_state = jnp.exp(total) * state + _mm(X * jnp.exp(total - s), Bm, transpose_a=True)
    if not with_output:
        return None, new_state
    y = _mm(_mm(Cm, Bm, transpose_b=True) * decay, X) + jnp.exp(s) * _mm(Cm, state, transpose_b=True)
    return y, new_state


def _chunk_backward(x, dt, a, Bm, Cm, entering, dy, d_leaving, masks):
    """Cotangents of one chunk given those of its output (dy) and of the state leaving it."""
    _, upper, eye = masks
    s, decay, total = _decays(a, masks)
    X = x * dt
    s_exp, to_end = jnp.exp(s), jnp.exp(total - s)
    M = _mm(Cm, Bm, transpose_b=True) * decay  # y_i = sum_j M_ij X_j within the chunk

    dX = _mm(M, dy, transpose_a=True) + to_end * _mm(Bm, d_leaving, transpose_b=True)
    dM = _mm(dy, X, transpose_b=True)
    d_scores = dM * decay
    dC = _mm(d_scores, Bm) + s_exp * _mm(dy, entering)
    dB = _mm(d_scores, Cm, transpose_a=True) + to_end * _mm(X, d_leaving)

    # d/ds of the log-decays. decay_ij = exp(s_i - s_j) enters s_i with + and s_j with -.
    dMM = dM * M
    readout = s_exp * _mm(Cm, entering, transpose_b=True)
    d_to_end = to_end * jnp.sum(X * _mm(Bm, d_leaving, transpose_b=True), axis=1, keepdims=True)
    ds_col = jnp.sum(dMM, axis=1, keepdims=True) + jnp.sum(dy * readout, axis=1, keepdims=True) - d_to_end
    ds_row = _to_row(ds_col, eye) - jnp.sum(dMM, axis=0, keepdims=True)
    ds_total = jnp.exp(total) * jnp.sum(d_leaving * entering) + jnp.sum(d_to_end)
    # s = cumsum(a): da_k = sum_{i >= k} ds_i, and s_end (= s_{q-1}) reaches every a_k.
    da = jnp.sum(jnp.where(upper, ds_row, 0.0), axis=1, keepdims=True) + ds_total

    d_entering = jnp.exp(total) * d_leaving + _mm(s_exp * dy, Cm, transpose_a=True)
    ddt = jnp.sum(dX * x, axis=1, keepdims=True)
    return dict(dx=dX * dt, ddt=ddt, da=da, dB=dB, dC=dC), d_entering


# ----- kernels ----------------------------------------------------------------------------------------


def _forward_kernel(x_ref, dt_ref, a_ref, B_ref, C_ref, init_ref, *refs, plan, n_chunks, emit_states):
    """Either (y, final state) or, for the backward, the state entering every chunk."""
    outs, scratch = (refs[:1], refs[1:]) if emit_states else (refs[:2], refs[2:])
    masks = _masks(plan.chunk)

    def body(state):
        chunk_inputs = (x_ref[...].astype(f32), dt_ref[...], a_ref[...], B_ref[...].astype(f32),
                        C_ref[...].astype(f32))
        if emit_states:
            outs[0][...] = state
            return _chunk_forward(*chunk_inputs, state, masks, with_output=False)[1]
        y, state = _chunk_forward(*chunk_inputs, state, masks, with_output=True)
        outs[0][...] = y.astype(outs[0].dtype)
        return state

    final = _walk(n_chunks, init_ref[...].astype(f32), body, scratch)
    if not emit_states:
        _store_at_last_step(n_chunks, outs[1], final)


def _backward_kernel(x_ref, dt_ref, a_ref, B_ref, C_ref, states_ref, dy_ref, d_final_ref,
                     dx_ref, ddt_ref, da_ref, dB_ref, dC_ref, d_init_ref, *scratch, plan, n_chunks):
    """Walks the chunks in reverse, carrying the cotangent of the state leaving the current chunk."""
    masks = _masks(plan.chunk)

    def body(d_leaving):
        grads, d_entering = _chunk_backward(
            x_ref[...].astype(f32), dt_ref[...], a_ref[...], B_ref[...].astype(f32), C_ref[...].astype(f32),
            states_ref[...], dy_ref[...].astype(f32), d_leaving, masks)
        dx_ref[...] = grads["dx"]
        ddt_ref[...] = grads["ddt"]
        da_ref[...] = grads["da"]
        dB_ref[...] = grads["dB"]
        dC_ref[...] = grads["dC"]
        return d_entering

    d_init = _walk(n_chunks, d_final_ref[...].astype(f32), body, scratch)
    _store_at_last_step(n_chunks, d_init_ref, d_init)


# ----- the custom VJP: padding, layouts, and the reductions outside the kernels -----------------------


def _kernel_inputs(x, dt, A, B, C, starts, plan):
    """Head-major inputs with time padded to whole chunks (Mosaic takes the full head_dim and state)."""
    padded = -(-x.shape[1] // plan.chunk) * plan.chunk
    dt32 = dt.astype(f32)[..., None]  # [b, l, h, 1]: a column per chunk
    a = dt32 * A.astype(f32)[:, None] - DOCUMENT_RESET * starts[:, :, None, None]
    return [plan.to_layout(pad(t, padded)) for t in (x, dt32, a, B, C)], padded


def _forward_specs(plan, padded, p, n, r):
    return [plan.seq_spec(padded, p), plan.seq_spec(padded, 1), plan.seq_spec(padded, 1),
            plan.seq_spec(padded, n, r), plan.seq_spec(padded, n, r), plan.state_spec(p, n)]


def _run_forward(x, dt, A, B, C, init, starts, plan, emit_states):
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    inputs, padded = _kernel_inputs(x, dt, A, B, C, starts, plan)
    n_chunks = padded // plan.chunk
    kernel = functools.partial(_forward_kernel, plan=plan, n_chunks=n_chunks, emit_states=emit_states)
    if emit_states:
        out_specs = plan.states_spec(n_chunks, p, n)
        out_shape = jax.ShapeDtypeStruct((b, h, n_chunks, p, n), f32)
    else:
        out_specs = [plan.seq_spec(padded, p), plan.state_spec(p, n)]
        out_shape = [plan.layout_struct(b, padded, h, p), jax.ShapeDtypeStruct((b, h, p, n), f32)]
    outs = plan.call(kernel, plan.grid(b, h, n_chunks), _forward_specs(plan, padded, p, n, h // g),
                     out_specs, out_shape, (p, n))(*inputs, init.astype(f32))
    if emit_states:
        return outs
    y, final = outs
    return plan.from_layout(y)[:, :length], final


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd(x, dt, A, B, C, init, starts, plan):
    return _run_forward(x, dt, A, B, C, init, starts, plan, emit_states=False)


def _ssd_fwd(x, dt, A, B, C, init, starts, plan):
    return _ssd(x, dt, A, B, C, init, starts, plan), (x, dt, A, B, C, init, starts)


def _ssd_bwd(plan, residuals, cotangents):
    x, dt, A, B, C, init, starts = residuals
    dy, d_final = cotangents
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    states = _run_forward(x, dt, A, B, C, init, starts, plan, emit_states=True)
    inputs, padded = _kernel_inputs(x, dt, A, B, C, starts, plan)
    n_chunks = padded // plan.chunk
    seq, time = plan.seq_spec(padded, p, reverse=True), plan.seq_spec(padded, 1, reverse=True)
    group_seq = plan.seq_spec(padded, n, h // g, reverse=True)
    head_seq_n = plan.seq_spec(padded, n, reverse=True)
    in_specs = [seq, time, time, group_seq, group_seq, plan.states_spec(n_chunks, p, n, reverse=True),
                seq, plan.state_spec(p, n)]
    out_specs = [seq, time, time, head_seq_n, head_seq_n, plan.state_spec(p, n)]
    out_shape = [plan.layout_struct(b, padded, h, p), plan.layout_struct(b, padded, h, 1),
                 plan.layout_struct(b, padded, h, 1), plan.layout_struct(b, padded, h, n),
                 plan.layout_struct(b, padded, h, n), jax.ShapeDtypeStruct((b, h, p, n), f32)]
    kernel = functools.partial(_backward_kernel, plan=plan, n_chunks=n_chunks)
    dy_in = plan.to_layout(pad(dy.astype(f32), padded))
    dx, ddt, da, dB_h, dC_h, d_init = plan.call(
        kernel, plan.grid(b, h, n_chunks), in_specs, out_specs, out_shape, (p, n))(
        *inputs, states, dy_in, d_final.astype(f32))

    dx = plan.from_layout(dx)[:, :length]
    ddt, da = (plan.from_layout(t)[:, :length, :, 0] for t in (ddt, da))
    dB, dC = (plan.from_layout(t)[:, :length].reshape(b, length, g, h // g, n).sum(3) for t in (dB_h, dC_h))
    dt32 = dt.astype(f32)
    ddt = ddt + da * A.astype(f32)  # a = dt * A
    dA = jnp.sum(da * dt32, axis=(0, 1))
    return (dx.astype(x.dtype), ddt.astype(dt.dtype), dA.astype(A.dtype), dB.astype(B.dtype),
            dC.astype(C.dtype), d_init.astype(init.dtype), jnp.zeros_like(starts))


_ssd.defvjp(_ssd_fwd, _ssd_bwd)
