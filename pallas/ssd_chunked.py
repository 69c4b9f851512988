"""Chunk-parallel Mamba-2 SSD kernels for GPUs (Pallas on Triton).

The scan is organised like mamba_ssm's SSD: every (batch, chunk, head) is independent but for one small
sequential pass over chunk states, so a batch of one still fills the GPU. With s the in-chunk cumulative
log-decay (computed in XLA around the kernels) and X_j = dt_j x_j:

forward   1. `_states_kernel`   (b, c, h):      each chunk's own final state H_c = sum_j e^{s_end - s_j} X_j B_j^T,
                                                accumulated over row blocks.
          2. `_pass_kernel`     (b, h, blocks): entering states E_c = e^{s_end,c-1} E_{c-1} + H_{c-1}, and the final
                                                state; sequential over chunks but only elementwise over [p * n].
          3. `_scan_kernel`     (b, c * rb, h): y of one block of rows: the in-chunk product sum_j (C_i B_j)
                                                e^{s_i - s_j} X_j over column blocks up to the diagonal, plus
                                                e^{s_i} C_i E_c.
backward  1 and 2 again (the forward stores nothing), then
          4. `_dstates_kernel`  (b, c, h):      each chunk's read-out cotangent G_c = sum_i e^{s_i} dy_i C_i^T;
          2'. the same pass in reverse:          T_c, the cotangent of the state leaving chunk c, and of the
                                                initial state;
          5. `_backward_kernel` (b, c * rb, h): dx, the log-decay cotangents and per-head dB, dC of one row block.

Dot operands are in the input dtype (bf16 on tensor cores), accumulation in fp32; no program holds more
than a (rows x rows) tile of the (Q x Q) products. `ChunkedPlan` fixes every tile size, and
`ChunkedPlan.on_chip` estimates what each kernel stages on chip (checked by `pallas/budget.py`).
On the CPU the kernels run with `interpret=True`.
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
ROW_BLOCKS = (64, 32, 16, 8, 4, 2, 1)  # candidates, largest first: the plan takes the largest that fits
PASS_BLOCK = 2048  # state elements per program of the state pass


@dataclasses.dataclass(frozen=True)
class ChunkedPlan:
    """Static tile sizes of one call (hashable: a non-differentiable argument of the custom VJP)."""

    chunk: int  # Q
    rows: int  # row block of the (Q x Q) products
    head_dim: int  # padded to a power of two (>= 16): Triton's loads and dots need it
    state: int  # padded likewise
    dtype: str  # dot operand dtype: the inputs'
    interpret: bool
    num_warps: int = 4
    num_stages: int = 2  # software pipelining of the row-block loops: their loads are staged this often
    devices = budget.GPU_SHARED_MEMORY  # where `on_chip` must fit

    @property
    def row_blocks(self) -> int:
        return self.chunk // self.rows

    @property
    def pass_block(self) -> int:
        return min(self.head_dim * self.state, PASS_BLOCK)

    def on_chip(self) -> dict[str, int]:
        """Bytes each kernel stages in shared memory: the dot operand tiles of its largest phase (Triton
        allocates shared buffers by liveness, so phases reuse them). A loop phase holds the operands it
        loads `num_stages` times (software pipelining) beside those it reuses on every step."""
        r, p, n, s = self.rows, self.head_dim, self.state, self.num_stages
        item = jnp.dtype(self.dtype).itemsize
        state_product = s * (r * p + r * n)  # [r, p]^T x [r, n] per step, looped over the chunk
        scan = max(s * (r * n + r * r + r * p) + r * n,  # loop: B_k, M, x_k; C_m reused
                   r * n + p * n)  # read-out: C_m, E
        backward = max(s * (r * n + r * p + 2 * r * r) + r * n + r * p,  # later rows: C_k, dy_k, M, dM; B_m, X_m
                       s * (r * n + r * p + 2 * r * r) + r * p + r * n,  # earlier columns: B_k, X_k, dM, M; dy_m, C_m
                       r * n + r * p + p * n)  # state terms, T's (B_m, X_m, T), then E's (C_m, dy_m, E)
        return {"states": state_product * item, "scan": scan * item, "dstates": state_product * item,
                "backward": backward * item, "pass": 2 * self.pass_block * 4}


def make_plan(chunk: int, head_dim: int, state: int, dtype, interpret: bool, rows: int | None = None
              ) -> ChunkedPlan:
    """The tile plan for these shapes: the largest row block that divides the chunk and whose kernels fit
    the smallest shared memory of the GPUs we claim (`budget.GPU_PLAN_LIMIT`)."""
    width = lambda w: max(16, pl.next_power_of_2(w))  # noqa: E731
    if not interpret and (chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"pallas ssd (chunked): chunk_size {chunk} must be a power of two >= 16 on the GPU "
                         "(Triton's tiles)")
    plan = functools.partial(ChunkedPlan, chunk, head_dim=width(head_dim), state=width(state),
                             dtype=jnp.dtype(dtype).name, interpret=interpret)
    if rows is not None:
        return plan(rows=rows)
    for candidate in ROW_BLOCKS:
        if candidate <= chunk and chunk % candidate == 0 and (interpret or candidate >= 16):
            fitted = plan(rows=candidate)
            if max(fitted.on_chip().values()) <= budget.GPU_PLAN_LIMIT:
                return fitted
    raise ValueError(f"pallas ssd (chunked): no row block fits chunk {chunk}, head_dim {head_dim}, state {state} "
                     f"({jnp.dtype(dtype).name}) in {budget.GPU_PLAN_LIMIT} bytes of shared memory")


# ----- helpers inside kernels ---------------------------------------------------------------------------


def _mm(a, b, transpose_a=False, transpose_b=False):
    """a @ b (optionally transposed) in fp32; fp32 operands at full precision (Triton would take TF32)."""
    dims = ((0 if transpose_a else 1,), (1 if transpose_b else 0,))
    precision = jax.lax.Precision.HIGHEST if a.dtype == f32 else None
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=f32)


def _decay(s_rows, s_cols, row_block, col_block, size):
    """exp(s_i - s_j) where row i (of block `row_block`) is at or after column j (of `col_block`), else 0."""
    i = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0) + row_block * size
    j = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1) + col_block * size
    return jnp.exp(jnp.where(i >= j, s_rows[:, None] - s_cols[None, :], -jnp.inf))


# ----- kernels --------------------------------------------------------------------------------------------


def _states_kernel(x_ref, dt_ref, s_ref, B_ref, H_ref, *, plan):
    r, dtype = plan.rows, plan.dtype
    s_end = s_ref[plan.chunk - 1]  # the chunk's total log-decay

    def row_block(k, H):  # H += sum_j e^{s_end - s_j} X_j B_j^T over the rows of block k
        rows = pl.ds(k * r, r)
        weight = dt_ref[rows] * jnp.exp(s_end - s_ref[rows])
        X = (x_ref[rows, :].astype(f32) * weight[:, None]).astype(dtype)
        return H + _mm(X, B_ref[rows, :].astype(dtype), transpose_a=True)

    H_ref[...] = jax.lax.fori_loop(0, plan.row_blocks, row_block, jnp.zeros((plan.head_dim, plan.state), f32))


def _dstates_kernel(dy_ref, s_ref, C_ref, G_ref, *, plan):
    r, dtype = plan.rows, plan.dtype

    def row_block(k, G):  # G += sum_i e^{s_i} dy_i C_i^T over the rows of block k
        rows = pl.ds(k * r, r)
        d_readout = (dy_ref[rows, :] * jnp.exp(s_ref[rows])[:, None]).astype(dtype)
        return G + _mm(d_readout, C_ref[rows, :].astype(dtype), transpose_a=True)

    G_ref[...] = jax.lax.fori_loop(0, plan.row_blocks, row_block, jnp.zeros((plan.head_dim, plan.state), f32))


def _pass_kernel(h_ref, decay_ref, first_ref, out_ref, last_ref, *, reverse):
    """out[c] = the running state before chunk c, then state = decay[c] * state + h[c]; in reverse order
    for the backward (the state's cotangent)."""
    n_chunks = h_ref.shape[0]

    def step(k, state):
        c = n_chunks - 1 - k if reverse else k
        out_ref[c, :] = state
        return decay_ref[c] * state + h_ref[c, :]

    last_ref[...] = jax.lax.fori_loop(0, n_chunks, step, first_ref[...])


def _scan_kernel(x_ref, dt_ref, s_ref, B_ref, C_ref, E_ref, y_ref, *, plan):
    r, dtype = plan.rows, plan.dtype
    m = pl.program_id(1) % plan.row_blocks
    rows = pl.ds(m * r, r)
    s_m, C_m = s_ref[rows], C_ref[rows, :].astype(dtype)

    def column_block(k, acc):
        cols = pl.ds(k * r, r)
        M = _mm(C_m, B_ref[cols, :].astype(dtype), transpose_b=True) * _decay(s_m, s_ref[cols], m, k, r)
        M = (M * dt_ref[cols][None, :]).astype(dtype)  # X_j = dt_j x_j, folded into the columns
        return acc + _mm(M, x_ref[cols, :].astype(dtype))

    y = jax.lax.fori_loop(0, m + 1, column_block, jnp.zeros((r, plan.head_dim), f32))
    readout = _mm(C_m, E_ref[...].astype(dtype), transpose_b=True)
    y_ref[...] = y + jnp.exp(s_m)[:, None] * readout


def _backward_kernel(x_ref, dt_ref, s_ref, B_ref, C_ref, E_ref, dy_ref, T_ref,
                     dx_ref, ddt_ref, ds_ref, dte_ref, dB_ref, dC_ref, *, plan):
    """Cotangents of one row block m of one chunk, given E (the entering state), T (the leaving state's
    cotangent) and dy. Within the chunk y_i = sum_j M_ij X_j, M_ij = (C_i . B_j) e^{s_i - s_j}, plus the
    read-out e^{s_i} C_i E; the leaving state is e^{s_end} E + sum_j e^{s_end - s_j} X_j B_j^T."""
    q, r, dtype = plan.chunk, plan.rows, plan.dtype
    m = pl.program_id(1) % plan.row_blocks
    rows = pl.ds(m * r, r)
    s_end = s_ref[q - 1]  # the chunk's total log-decay
    s_m, dt_m = s_ref[rows], dt_ref[rows]
    x_m = x_ref[rows, :].astype(f32)
    X_m = x_m * dt_m[:, None]
    X_m_op, B_m, C_m = X_m.astype(dtype), B_ref[rows, :].astype(dtype), C_ref[rows, :].astype(dtype)
    dy_m = dy_ref[rows, :]
    dy_m_op = dy_m.astype(dtype)

    # d(M_ij) M_ij, the log-decay cotangent of e^{s_i - s_j}, enters s_i with + (row sums, `earlier`) and
    # s_j with - (column sums, `later`). Summed in fp32 from the products themselves: the shortcut
    # <dy_i, y_i> - <X_i, dX_i> cancels badly once y and dX are rounded differently (bf16 operands).
    def later(k, carry):  # rows i of block k >= m against the columns j of block m: dX_j, dB_j
        dX, dB, column_sums = carry
        i_rows = pl.ds(k * r, r)
        C_k, dy_k = C_ref[i_rows, :].astype(dtype), dy_ref[i_rows, :].astype(dtype)
        decay = _decay(s_ref[i_rows], s_m, k, m, r)
        M = _mm(C_k, B_m, transpose_b=True) * decay
        dM = _mm(dy_k, X_m_op, transpose_b=True)
        return (dX + _mm(M.astype(dtype), dy_k, transpose_a=True),
                dB + _mm((dM * decay).astype(dtype), C_k, transpose_a=True),
                column_sums + jnp.sum(dM * M, axis=0))

    def earlier(k, carry):  # rows i of block m against the columns j of blocks k <= m: dC_i
        dC, row_sums = carry
        cols = pl.ds(k * r, r)
        B_k = B_ref[cols, :].astype(dtype)
        X_k = (x_ref[cols, :].astype(f32) * dt_ref[cols][:, None]).astype(dtype)
        decay = _decay(s_m, s_ref[cols], m, k, r)
        dM = _mm(dy_m_op, X_k, transpose_b=True)
        M = _mm(C_m, B_k, transpose_b=True) * decay
        return dC + _mm((dM * decay).astype(dtype), B_k), row_sums + jnp.sum(dM * M, axis=1)

    zeros = lambda *shape: jnp.zeros(shape, f32)  # noqa: E731
    dX, dB, column_sums = jax.lax.fori_loop(m, plan.row_blocks, later,
                                            (zeros(r, plan.head_dim), zeros(r, plan.state), zeros(r)))
    dC, row_sums = jax.lax.fori_loop(0, m + 1, earlier, (zeros(r, plan.state), zeros(r)))

    T, E = T_ref[...], E_ref[...]
    to_end, s_exp = jnp.exp(s_end - s_m), jnp.exp(s_m)
    BT = _mm(B_m, T.astype(dtype), transpose_b=True)  # [r, p]: the leaving state's cotangent, read back
    dX = dX + to_end[:, None] * BT
    dB_ref[...] = dB + to_end[:, None] * _mm(X_m_op, T.astype(dtype))
    dC_ref[...] = dC + s_exp[:, None] * _mm(dy_m_op, E.astype(dtype))

    # The read-out e^{s_i} C_i E reaches s_i; e^{s_end - s_j} reaches s_j with - and s_end with + (dte,
    # summed over the chunk in XLA); e^{s_end} E reaches s_end (added at the last row, whose reverse
    # cumsum reaches every position).
    readout = s_exp[:, None] * _mm(C_m, E.astype(dtype), transpose_b=True)
    d_to_end = to_end * jnp.sum(X_m * BT, axis=1)
    global_row = jax.lax.broadcasted_iota(jnp.int32, (r,), 0) + m * r
    through_entering = jnp.where(global_row == q - 1, jnp.exp(s_end) * jnp.sum(T * E), 0.0)
    ds_ref[...] = row_sums - column_sums + jnp.sum(dy_m * readout, axis=1) - d_to_end + through_entering
    dte_ref[...] = d_to_end
    dx_ref[...] = dX * dt_m[:, None]
    ddt_ref[...] = jnp.sum(dX * x_m, axis=1)


# ----- specs and calls ------------------------------------------------------------------------------------


class _Specs:
    """BlockSpecs over the padded arrays: sequences [b, L, h|g, width], per-position scalars [b, h, L],
    per-chunk states [b, c, h, p, n]. Grids are (b, chunk, h) or (b, chunk x row block, h)."""

    def __init__(self, plan: ChunkedPlan, heads_per_group: int, by_rows: bool):
        self.plan, self.r = plan, heads_per_group
        self.per = plan.row_blocks if by_rows else 1  # grid steps per chunk along axis 1

    def seq(self, width, group=False):
        r, per = self.r if group else 1, self.per
        return pl.BlockSpec((None, self.plan.chunk, None, width), lambda i, t, j: (i, t // per, j // r, 0))

    def scalars(self):
        per = self.per
        return pl.BlockSpec((None, None, self.plan.chunk), lambda i, t, j: (i, j, t // per))

    def state(self):
        per, p, n = self.per, self.plan.head_dim, self.plan.state
        return pl.BlockSpec((None, None, None, p, n), lambda i, t, j: (i, t // per, j, 0, 0))

    def row_seq(self, width):  # outputs of one row block
        return pl.BlockSpec((None, self.plan.rows, None, width), lambda i, t, j: (i, t, j, 0))

    def row_scalars(self):
        return pl.BlockSpec((None, None, self.plan.rows), lambda i, t, j: (i, j, t))


def _call(plan: ChunkedPlan, kernel, grid, in_specs, out_specs, out_shape):
    """`pallas_call` of `kernel` (its static arguments already bound) with the plan's Triton parameters."""
    kwargs = {}
    if not plan.interpret:
        from jax.experimental.pallas import triton as pltriton

        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=plan.interpret, **kwargs)


def _state_pass(plan: ChunkedPlan, increments, chunk_decay, first, reverse: bool):
    """(running state before each chunk [b, c, h, p, n], state after the last) for the forward, or the
    same in reverse for the cotangents."""
    b, c, h, p, n = increments.shape
    k = plan.pass_block
    flat = increments.reshape(b, c, h, p * n)
    kernel = functools.partial(_pass_kernel, reverse=reverse)
    out, last = _call(
        plan, kernel, (b, h, p * n // k),
        [pl.BlockSpec((None, c, None, k), lambda i, j, e: (i, 0, j, e)),
         pl.BlockSpec((None, None, c), lambda i, j, e: (i, j, 0)),
         pl.BlockSpec((None, None, k), lambda i, j, e: (i, j, e))],
        [pl.BlockSpec((None, c, None, k), lambda i, j, e: (i, 0, j, e)),
         pl.BlockSpec((None, None, k), lambda i, j, e: (i, j, e))],
        [jax.ShapeDtypeStruct(flat.shape, f32), jax.ShapeDtypeStruct((b, h, p * n), f32)],
    )(flat, chunk_decay, first.reshape(b, h, p * n))
    return out.reshape(b, c, h, p, n), last.reshape(b, h, p, n)


def _prepare(x, dt, A, B, C, starts, plan):
    """Padded kernel inputs, and the in-chunk cumulative log-decays s and chunk decays e^{s_end}."""
    b, length, h, _ = x.shape
    q = plan.chunk
    padded = -(-length // q) * q
    dt32 = pad(dt.astype(f32), padded)
    a = dt32 * A.astype(f32) - DOCUMENT_RESET * pad(starts, padded)[..., None]
    a = a.reshape(b, padded // q, q, h)
    s = jnp.cumsum(a, axis=2)
    chunk_decay = jnp.exp(s[:, :, -1, :]).transpose(0, 2, 1)  # [b, h, c]
    head_major = lambda t: t.reshape(b, padded, h).transpose(0, 2, 1)  # noqa: E731
    seqs = (pad(x, padded, plan.head_dim), head_major(dt32), head_major(s),
            pad(B, padded, plan.state), pad(C, padded, plan.state))
    return seqs, chunk_decay, padded


def _pad_state(t: jax.Array, head_dim: int, state: int) -> jax.Array:
    """A [b, h, p, n] state in fp32, padded to [b, h, head_dim, state]."""
    return jnp.pad(t.astype(f32), [(0, 0), (0, 0), (0, head_dim - t.shape[2]), (0, state - t.shape[3])])


def _entering_states(plan, seqs, chunk_decay, init):
    x, dt, s, B, _ = seqs
    b, padded, h, p = x.shape
    c, n = padded // plan.chunk, plan.state
    specs = _Specs(plan, h // B.shape[2], by_rows=False)
    H = _call(plan, functools.partial(_states_kernel, plan=plan), (b, c, h),
              [specs.seq(p), specs.scalars(), specs.scalars(), specs.seq(n, group=True)], specs.state(),
              jax.ShapeDtypeStruct((b, c, h, p, n), f32))(x, dt, s, B)
    return _state_pass(plan, H, chunk_decay, init, reverse=False)


def _forward(plan, seqs, chunk_decay, init):
    x, dt, s, B, C = seqs
    b, padded, h, p = x.shape
    entering, final = _entering_states(plan, seqs, chunk_decay, init)
    specs = _Specs(plan, h // B.shape[2], by_rows=True)
    y = _call(plan, functools.partial(_scan_kernel, plan=plan), (b, padded // plan.rows, h),
              [specs.seq(p), specs.scalars(), specs.scalars(), specs.seq(plan.state, group=True),
               specs.seq(plan.state, group=True), specs.state()], specs.row_seq(p),
              jax.ShapeDtypeStruct((b, padded, h, p), f32))(x, dt, s, B, C, entering)
    return y, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def ssd_chunked_kernels(x, dt, A, B, C, init, starts, plan: ChunkedPlan):
    """(y in fp32 without the D term, final state): `pallas.ssd.ssd`'s GPU path with an explicit plan;
    `starts` [b, l] marks packed documents' first positions (`ssd_common.document_starts`)."""
    return _ssd_fwd(x, dt, A, B, C, init, starts, plan)[0]


def _ssd_fwd(x, dt, A, B, C, init, starts, plan):
    b, length, h, p = x.shape
    n = B.shape[-1]
    seqs, chunk_decay, _ = _prepare(x, dt, A, B, C, starts, plan)
    y, final = _forward(plan, seqs, chunk_decay, _pad_state(init, plan.head_dim, plan.state))
    out = (y[:, :length, :, :p], final[:, :, :p, :n])
    return out, (x, dt, A, B, C, init, starts)


def _ssd_bwd(plan, residuals, cotangents):
    x, dt, A, B, C, init, starts = residuals
    dy, d_final = cotangents
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    seqs, chunk_decay, padded = _prepare(x, dt, A, B, C, starts, plan)
    xp, dtp, s, Bp, Cp = seqs
    q, pp, np_ = plan.chunk, plan.head_dim, plan.state
    c = padded // q
    entering, _ = _entering_states(plan, seqs, chunk_decay, _pad_state(init, plan.head_dim, plan.state))
    dyp = pad(dy.astype(f32), padded, pp)

    specs = _Specs(plan, h // g, by_rows=False)
    G = _call(plan, functools.partial(_dstates_kernel, plan=plan), (b, c, h),
              [specs.seq(pp), specs.scalars(), specs.seq(np_, group=True)], specs.state(),
              jax.ShapeDtypeStruct((b, c, h, pp, np_), f32))(dyp, s, Cp)
    d_final = _pad_state(d_final, plan.head_dim, plan.state)
    leaving_cotangents, d_init = _state_pass(plan, G, chunk_decay, d_final, reverse=True)

    specs = _Specs(plan, h // g, by_rows=True)
    seq_f32 = lambda w: jax.ShapeDtypeStruct((b, padded, h, w), f32)  # noqa: E731
    scalars_f32 = jax.ShapeDtypeStruct((b, h, padded), f32)
    dx, ddt, ds, dte, dB_h, dC_h = _call(
        plan, functools.partial(_backward_kernel, plan=plan), (b, padded // plan.rows, h),
        [specs.seq(pp), specs.scalars(), specs.scalars(), specs.seq(np_, group=True), specs.seq(np_, group=True),
         specs.state(), specs.seq(pp), specs.state()],
        [specs.row_seq(pp), specs.row_scalars(), specs.row_scalars(), specs.row_scalars(), specs.row_seq(np_),
         specs.row_seq(np_)],
        [seq_f32(pp), scalars_f32, scalars_f32, scalars_f32, seq_f32(np_), seq_f32(np_)],
    )(xp, dtp, s, Bp, Cp, entering, dyp, leaving_cotangents)

    # s = in-chunk cumsum of a = dt * A: da_k = sum_{i >= k} ds_i, plus every position's share of s_end.
    by_chunk = lambda t: t.reshape(b, h, c, q)  # noqa: E731
    da = (jnp.flip(jnp.cumsum(jnp.flip(by_chunk(ds), -1), -1), -1)
          + jnp.sum(by_chunk(dte), -1, keepdims=True)).reshape(b, h, padded)
    dt32 = dtp.reshape(b, h, padded)
    ddt = (ddt + da * A.astype(f32)[:, None]).transpose(0, 2, 1)[:, :length]
    dA = jnp.sum(da * dt32, axis=(0, 2))
    dB, dC = (t[:, :length, :, :n].reshape(b, length, g, h // g, n).sum(3) for t in (dB_h, dC_h))
    return (dx[:, :length, :, :p].astype(x.dtype), ddt.astype(dt.dtype), dA.astype(A.dtype), dB.astype(B.dtype),
            dC.astype(C.dtype), d_init[:, :, :p, :n].astype(init.dtype), jnp.zeros_like(starts))


ssd_chunked_kernels.defvjp(_ssd_fwd, _ssd_bwd)
