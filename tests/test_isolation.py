"""Packed documents kept apart (`segment_ids`): a packed window gives each document what it gets alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import NemotronH, load_hf
from nemojax.ops.conv import causal_conv1d_silu
from nemojax.ops.ssd import ssd_chunked

# Three documents in 21 tokens with chunks of 8: one boundary on a chunk edge (8), one mid-chunk (13).
LENGTHS = (8, 5, 8)
SEGMENTS = np.repeat(np.arange(len(LENGTHS)), LENGTHS)[None].astype(np.int32)
STARTS = np.cumsum((0,) + LENGTHS)


def pieces(t, axis=1):
    return [jax.lax.slice_in_dim(t, int(a), int(b), axis=axis) for a, b in zip(STARTS[:-1], STARTS[1:])]


def pallas_ssd(variant):
    """The Pallas kernels, interpreted; the chunked driver with 4-row blocks (its row loops run)."""
    from pallas.ssd import ssd
    from pallas.ssd_chunked import make_plan, ssd_chunked_kernels
    from pallas.ssd_common import document_starts

    if variant == "grid":
        return lambda *a, segment_ids=None, **k: ssd(*a, segment_ids=segment_ids, variant="grid", interpret=True, **k)

    def chunked(x, dt, A, B, C, chunk_size, D, initial_state=None, segment_ids=None):
        b, length, h, p = x.shape
        init = jnp.zeros((b, h, p, B.shape[-1])) if initial_state is None else initial_state
        plan = make_plan(chunk_size, p, B.shape[-1], x.dtype, interpret=True, rows=4)
        y, final = ssd_chunked_kernels(x, dt, A, B, C, init, document_starts(segment_ids, (b, length)), plan)
        return y + D[:, None] * x, final
    return chunked


@pytest.mark.parametrize("impl", ["xla", "grid", "chunked"])
def test_ssd_restarts_at_document_starts_values_and_gradients(impl):
    """The XLA scan and both Pallas drivers (interpreted), against the XLA scan of each document."""
    scan = ssd_chunked if impl == "xla" else pallas_ssd(impl)
    rng = np.random.default_rng(0)
    b, h, p, g, n, length = 1, 4, 3, 2, 5, sum(LENGTHS)
    x = jnp.asarray(rng.standard_normal((b, length, h, p)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.05, 0.5, (b, length, h)), jnp.float32)
    A = -jnp.asarray(rng.uniform(0.5, 2.0, (h,)), jnp.float32)
    B, C = (jnp.asarray(rng.standard_normal((b, length, g, n)), jnp.float32) for _ in range(2))
    D = jnp.asarray(rng.standard_normal((h,)), jnp.float32)
    init = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((b, length, h, p)), jnp.float32)

    def packed(x, dt, A, B, C, D, init):
        y, final = scan(x, dt, A, B, C, 8, D=D, initial_state=init, segment_ids=jnp.asarray(SEGMENTS))
        return jnp.sum(y * weights) + jnp.sum(final ** 2)

    def alone(x, dt, A, B, C, D, init):
        total, state = 0.0, init
        for i, (xs, dts, Bs, Cs, ws) in enumerate(zip(*(pieces(t) for t in (x, dt, B, C, weights)))):
            y, state = ssd_chunked(xs, dts, A, Bs, Cs, 8, D=D, initial_state=init if i == 0 else None)
            total = total + jnp.sum(y * ws)
        return total + jnp.sum(state ** 2)  # the final state is the last document's

    args = (x, dt, A, B, C, D, init)
    np.testing.assert_allclose(packed(*args), alone(*args), rtol=1e-5)
    grads = [jax.jit(jax.grad(f, argnums=range(7)))(*args) for f in (packed, alone)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_splash_attention_keeps_documents_apart():
    """Splash (interpreted) with segment ids equals the XLA attention of each document alone."""
    from nemojax.ops.attention import causal_attention
    from pallas.attention import splash_causal_attention

    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, sum(LENGTHS), 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, sum(LENGTHS), 2, 16)), jnp.float32) for _ in range(2))
    packed = splash_causal_attention(q, k, v, jnp.asarray(SEGMENTS), interpret=True)
    alone = jnp.concatenate([causal_attention(*parts) for parts in zip(*(pieces(t) for t in (q, k, v)))], axis=1)
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def test_conv_does_not_look_back_across_a_document_start_values_and_gradients():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, sum(LENGTHS), 3)), jnp.float32)
    w, bias = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32), jnp.asarray(rng.standard_normal(3), jnp.float32)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    packed = lambda x, w, bias: causal_conv1d_silu(x, w, bias, jnp.asarray(SEGMENTS))  # noqa: E731
    alone = lambda x, w, bias: jnp.concatenate([causal_conv1d_silu(piece, w, bias)  # noqa: E731
                                                for piece in pieces(x)], axis=1)
    np.testing.assert_allclose(packed(x, w, bias), alone(x, w, bias), rtol=1e-6, atol=1e-6)
    # and the gradients (on the CPU: the blocked backward with each tap masked at document starts)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(x, w, bias)
             for f in (packed, alone)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, ssm_impl", [("dense", "xla"), ("moe", "xla"), ("dense", "pallas"), ("moe", "pallas")])
def test_packed_window_equals_each_document_alone(hf_checkpoints, token_batch, kind, ssm_impl):
    """Logits and every parameter's gradient (fp32; the XLA SSD scan or the interpreted Pallas kernels)."""
    cfg, params = load_hf(hf_checkpoints(kind)[1])
    cfg = dataclasses.replace(cfg, ssm_impl=ssm_impl)
    model = NemotronH(cfg)
    tokens = jnp.asarray(token_batch[:1])
    rng = np.random.default_rng(2)
    weights = jnp.asarray(rng.standard_normal((1, tokens.shape[1], cfg.vocab_size)), jnp.float32)

    @jax.jit
    def logits(params, ids, segment_ids=None):
        hidden = model.apply({"params": params}, ids, segment_ids=segment_ids, method="hidden")
        return model.apply({"params": params}, hidden, method="logits")

    def packed(params):
        return logits(params, tokens, jnp.asarray(SEGMENTS))

    rows = np.zeros((len(LENGTHS), tokens.shape[1]), np.int32)  # each document alone, right-padded (causal)
    for row, (start, length) in enumerate(zip(STARTS, LENGTHS)):
        rows[row, :length] = token_batch[0, start:start + length]

    def alone(params):
        out = logits(params, jnp.asarray(rows))
        return jnp.concatenate([out[row:row + 1, :length] for row, length in enumerate(LENGTHS)], axis=1)

    np.testing.assert_allclose(packed(params), alone(params), rtol=1e-5, atol=1e-5)
    unpacked = logits(params, tokens)
    assert np.abs(np.asarray(unpacked - alone(params))[:, LENGTHS[0]:]).max() > 1e-3  # isolation changes something
    grads = [jax.jit(jax.grad(lambda p, f=f: jnp.sum(f(p) * weights)))(params) for f in (packed, alone)]
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads[1])):
        scale = max(float(jnp.abs(want).max()), 1e-6)
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_data_pipeline_numbers_the_documents_of_a_window():
    from nemojax.data.pipeline import with_segment_ids
    from nemojax.data.synthetic import synthetic_example

    example = with_segment_ids(synthetic_example(seed=0, index=3, seq_len=96))
    seg, tokens = example["segment_ids"], example["tokens"]
    assert seg[0] == 0 and np.all(np.diff(seg) >= 0) and seg[-1] >= 2
    starts = np.flatnonzero(np.diff(seg)) + 1
    assert np.all(tokens[starts - 1] == ord("\n"))  # each new document follows an end of document
