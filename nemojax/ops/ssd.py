"""The Mamba-2 SSD (state space duality) scan in pure JAX.

Recurrence, per head h (state S of shape [head_dim, state]):
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T,      y_t = S_t C_t + D * x_t.

`ssd_chunked` evaluates it in chunks of Q tokens: inside a chunk as a masked (Q x Q) "attention"
product, across chunks through the chunk-final states, combined with `jax.lax.associative_scan`.
Memory is O(L * Q) per head, never O(L^2). `ssd_sequential` is the token-by-token reference that
the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

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
) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """Chunked SSD scan. `dt` is already discretised (softplus, clamp). Returns (y in fp32, final state)."""
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g  # heads per group
    q = chunk_size
    pad = -length % q
    c = (length + pad) // q

    x32, dt32 = x.astype(f32), dt.astype(f32)
    # Padded steps have dt = 0: no decay and no input, so they change neither outputs nor the final state.
    padded = [jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (x32 * dt32[..., None], dt32, B, C)]
    xdt = padded[0].reshape(b, c, q, g, r, p)
    a = (padded[1] * A.astype(f32)).reshape(b, c, q, g, r)
    Bc = padded[2].astype(f32).reshape(b, c, q, g, n)
    Cc = padded[3].astype(f32).reshape(b, c, q, g, n)

    a_cum = jnp.cumsum(a, axis=2)  # [b c q g r]: log-decay from chunk start through step q
    a_end = a_cum[:, :, -1]  # [b c g r]

    # 1. Within each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_cum_i - a_cum_j) xdt_j.
    causal = jnp.tril(jnp.ones((q, q), dtype=bool))
    log_decay = a_cum[:, :, :, None] - a_cum[:, :, None, :]  # [b c i j g r]
    decay = jnp.exp(jnp.where(causal[:, :, None, None], log_decay, -jnp.inf))
    scores = jnp.einsum("bcign,bcjgn->bcijg", Cc, Bc)
    y = jnp.einsum("bcijg,bcijgr,bcjgrp->bcigrp", scores, decay, xdt)

    # 2. Each chunk's own contribution to the state at its end.
    to_end = jnp.exp(a_end[:, :, None] - a_cum)  # [b c q g r]
    chunk_states = jnp.einsum("bcjgn,bcjgr,bcjgrp->bcgrpn", Bc, to_end, xdt)

    # 3. Across chunks: S_c = exp(a_end_c) S_{c-1} + chunk_states_c, as an associative scan.
    chunk_decay = jnp.exp(a_end)  # [b c g r]
    if initial_state is not None:
        init = initial_state.astype(f32).reshape(b, g, r, p, n)
        chunk_states = chunk_states.at[:, 0].add(chunk_decay[:, 0, :, :, None, None] * init)
    else:
        init = jnp.zeros((b, g, r, p, n), f32)

    def combine(left, right):
        decay_l, state_l = left
        decay_r, state_r = right
        return decay_l * decay_r, decay_r[..., None, None] * state_l + state_r

    _, states = jax.lax.associative_scan(combine, (chunk_decay, chunk_states), axis=1)
    final_state = states[:, -1]
    entering = jnp.concatenate([init[:, None], states[:, :-1]], axis=1)  # state before each chunk

    # 4. The entering state's contribution to each output.
    y = y + jnp.einsum("bcign,bcgrpn,bcigr->bcigrp", Cc, entering, jnp.exp(a_cum))

    y = y.reshape(b, c * q, h, p)[:, :length]
    if D is not None:
        y = y + D.astype(f32)[:, None] * x32
    return y, final_state.reshape(b, h, p, n)


def ssd_sequential(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, " h"],
    B: Float[Array, "b l g n"],
    C: Float[Array, "b l g n"],
    D: Float[Array, " h"] | None = None,
    initial_state: Float[Array, "b h p n"] | None = None,
) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """Token-by-token recurrence (test reference only: slow, but obviously right)."""
    b, _, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    state = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)

    def step(state, inputs):
        x_t, dt_t, B_t, C_t = inputs  # [b h p], [b h], [b g n], [b g n]
        B_h = jnp.repeat(B_t, r, axis=1)
        C_h = jnp.repeat(C_t, r, axis=1)
        state = (jnp.exp(dt_t * A)[..., None, None] * state
                 + (dt_t[..., None] * x_t)[..., None] * B_h[:, :, None, :])
        return state, jnp.einsum("bhpn,bhn->bhp", state, C_h)

    inputs = tuple(jnp.moveaxis(t.astype(f32), 1, 0) for t in (x, dt, B, C))
    state, ys = jax.lax.scan(step, state, inputs)
    y = jnp.moveaxis(ys, 0, 1)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y, state
