"""The Pallas kernels (interpreted on the CPU) against the XLA paths: the SSD scan alone, both kernels in
the model, and both under a mesh."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import nemojax
from nemojax.model import NemotronH
from nemojax.ops.ssd import ssd_chunked
from pallas.attention import splash_causal_attention
from pallas.ssd import ssd
from tests.test_sharding import check_results

# (batch, length, heads, head_dim, groups, state, chunk): lengths not a multiple of the chunk, n_groups > 1,
# widths that need padding for Triton's power-of-two tiles.
SHAPES = {"3_heads_per_group": (2, 21, 6, 6, 2, 10, 8), "1_head_per_group": (1, 37, 4, 5, 4, 7, 16)}


def rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def make_inputs(shape, dtype):
    b, l, h, p, g, n, _ = shape
    k = jax.random.split(jax.random.key(0), 7)
    return dict(
        x=jax.random.normal(k[0], (b, l, h, p)).astype(dtype),
        dt=jax.nn.softplus(jax.random.normal(k[1], (b, l, h)) - 1.0),
        A=-jnp.exp(jax.random.normal(k[2], (h,))),
        B=jax.random.normal(k[3], (b, l, g, n)).astype(dtype),
        C=jax.random.normal(k[4], (b, l, g, n)).astype(dtype),
        D=jax.random.normal(k[5], (h,)),
        initial_state=jax.random.normal(k[6], (b, h, p, n)),
    )


def outputs_and_grads(fn, args, chunk):
    """(y, final state) and the gradients of every input of a scalar that uses both."""
    def objective(a):
        y, state = fn(chunk_size=chunk, **a)
        wy = jax.random.normal(jax.random.key(1), y.shape)
        ws = jax.random.normal(jax.random.key(2), state.shape)
        return jnp.sum(y * wy) + jnp.sum(state * ws), (y, state)

    (_, outputs), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(args)
    return outputs, grads


# Each case: (variant, shape, initial state?, input dtype). Both variants see both shapes, with and
# without an initial state; then bf16 inputs.
CASES = [("grid", "3_heads_per_group", True, "float32"), ("grid", "1_head_per_group", False, "float32"),
         ("loop", "3_heads_per_group", False, "float32"), ("loop", "1_head_per_group", True, "float32"),
         ("loop", "3_heads_per_group", True, "bfloat16")]


@pytest.mark.parametrize("variant, shape_name, with_state, dtype", CASES,
                         ids=[f"{v}-{s}-{'initial' if w else 'zero'}_state-{d}" for v, s, w, d in CASES])
def test_kernel_equals_the_xla_scan(variant, shape_name, with_state, dtype):
    shape = SHAPES[shape_name]
    args = make_inputs(shape, jnp.dtype(dtype))
    if not with_state:
        del args["initial_state"]
    (y, state), grads = outputs_and_grads(lambda **a: ssd(variant=variant, **a), args, shape[-1])
    (y_ref, state_ref), grads_ref = outputs_and_grads(ssd_chunked, args, shape[-1])
    tol = 1e-5 if dtype == "float32" else 1e-2
    assert rel(y, y_ref) < tol
    assert rel(state, state_ref) < tol
    for name in args:
        assert grads[name].dtype == args[name].dtype, name
        assert rel(grads[name].astype(jnp.float32), grads_ref[name].astype(jnp.float32)) < tol, name


def test_model_with_pallas_ssd_equals_xla(hf_checkpoints, token_batch):
    """`ssm_impl="pallas"` (interpreted here, chosen automatically on the CPU) in the whole model: logits
    and every parameter's gradient equal the XLA scan's. (Splash attention in the model: the next test.)"""
    cfg, params = nemojax.load_hf(hf_checkpoints("dense")[1])  # perturbed weights, no flax init to pay for
    ids = jnp.asarray(token_batch)

    def run(cfg):
        def loss(params):
            logits = NemotronH(cfg).apply({"params": params}, ids)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, logits), grads = run(cfg)
    (_, logits_k), grads_k = run(dataclasses.replace(cfg, ssm_impl="pallas"))
    assert rel(logits_k, logits) < 1e-5
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g_k = dict(jax.tree_util.tree_leaves_with_path(grads_k))[path]
        assert rel(g_k, g) < 1e-5, jax.tree_util.keystr(path)


def test_kernels_run_per_shard_under_a_mesh():
    """`ssm_impl="pallas"`, `attention_impl="splash"` under data=2, fsdp=2, tensor=2: each kernel sees
    one device's shard of batch (4 -> 1) and heads (4 -> 2), and the model's logits and gradients equal
    the XLA paths' on one device."""
    result = check_results("sharded_kernel_check")
    assert result["logits"] < 1e-5 and result["grads"] < 1e-5, result
    # One shard_map per kernel: the SSD scan's x [b, l, h, p] and B [b, l, g, n]; the attention's
    # q [b, l, heads, d] and k [b, l, kv_heads, d] (splash's mask tables come first).
    [(ssd_shapes, ssd_kernels), (attention_shapes, attention_kernels)] = result["shard_maps"]
    assert ssd_kernels == attention_kernels == 1
    assert ssd_shapes[0] == [1, 19, 2, 6] and ssd_shapes[3] == [1, 19, 1, 10], ssd_shapes
    assert attention_shapes[-3:] == [[1, 19, 2, 6], [1, 19, 1, 6], [1, 19, 1, 6]], attention_shapes


def test_unknown_variant_is_rejected():
    args = make_inputs(SHAPES["1_head_per_group"], jnp.float32)
    with pytest.raises(ValueError, match="variant 'cuda' is not one of"):
        ssd(chunk_size=16, variant="cuda", **args)


# Lowering for the accelerators without one: Mosaic (TPU v5p, named through an abstract device) and
# Triton, forward and backward, at Nemotron-H-like tile sizes (head_dim 64, state 128, chunk 128, bf16).
# This runs JAX's whole kernel lowering (block shapes, tiling rules, every op the kernels use); only the
# backend's final compile, on the device, is left. (cuDNN attention cannot be lowered without cuDNN.)
CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def lowered_text(fn, args, platform: str) -> str:
    from jax._src.mesh import AbstractDevice  # how JAX itself names a target device for AOT lowering

    def forward_and_backward(args):
        out, pullback = jax.vjp(fn, args)
        return out, pullback(jax.tree.map(jnp.ones_like, out))

    device = AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu") if platform == "tpu" else None
    unchecked = [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALLS[platform])]
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
        exported = jax.export.export(jax.jit(forward_and_backward), platforms=[platform],
                                     disabled_checks=unchecked)(args)
    return exported.mlir_module()


@pytest.mark.parametrize("variant, platform", [("grid", "tpu"), ("loop", "cuda")])
def test_ssd_kernels_lower_for_tpu_and_gpu(variant, platform):
    b, l, h, p, g, n, q = 1, 256, 2, 64, 1, 128, 128
    args = dict(x=jnp.zeros((b, l, h, p), jnp.bfloat16), dt=jnp.ones((b, l, h)), A=-jnp.ones((h,)),
                B=jnp.zeros((b, l, g, n), jnp.bfloat16), C=jnp.zeros((b, l, g, n), jnp.bfloat16),
                D=jnp.ones((h,)), initial_state=jnp.zeros((b, h, p, n)))
    text = lowered_text(lambda a: ssd(chunk_size=q, variant=variant, interpret=False, **a), args, platform)
    assert text.count(CUSTOM_CALLS[platform]) == 3  # the forward; the states pass and the backward


def test_splash_attention_lowers_for_tpu():
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    text = lowered_text(lambda a: splash_causal_attention(*a, interpret=False), (q, kv, kv), "tpu")
    assert text.count(CUSTOM_CALLS["tpu"]) >= 2  # forward and backward kernels
