"""The Pallas kernels (interpreted on the CPU) against the XLA paths: the SSD scan alone, both kernels in
the model, and both under a mesh."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

import nemojax
import pallas.ssd
from benchmarks.common import CUSTOM_CALLS, export_text
from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.ops.platform import CPU_ONLY
from nemojax.ops.ssd import ssd_chunked
from pallas import budget
from pallas.attention import splash_causal_attention
from pallas.ssd import ssd, tile_plan
from pallas.ssd_chunked import ChunkedPlan, make_plan, ssd_chunked_kernels
from pallas.ssd_grid import GridPlan
from tests.test_sharding import check_results

# (batch, length, heads, head_dim, groups, state, chunk): lengths not a multiple of the chunk, n_groups > 1,
# widths that need padding for Triton's power-of-two tiles, and the released widths: head_dim 64 (Nemotron-H,
# Nemotron 3) and 80 (Nano 2), state 128 and 256 (Nemotron-H 47B/56B).
SHAPES = {"3_heads_per_group": (2, 21, 6, 6, 2, 10, 8), "1_head_per_group": (1, 37, 4, 5, 4, 7, 16),
          "head_dim_80": (1, 45, 4, 80, 2, 128, 16), "state_256": (2, 37, 2, 64, 1, 256, 16)}


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


def chunked_with_rows(rows):
    """The GPU driver with an explicit row block, so a chunk spans several (the plan's loops run)."""
    def fn(x, dt, A, B, C, chunk_size, D, initial_state=None):
        init = jnp.zeros((*x.shape[:1], x.shape[2], x.shape[3], B.shape[-1])) if initial_state is None \
            else initial_state
        plan = make_plan(chunk_size, x.shape[-1], B.shape[-1], x.dtype, interpret=True, rows=rows)
        y, final = ssd_chunked_kernels(x, dt, A, B, C, init, jnp.zeros(x.shape[:2]), plan)
        return y + D[:, None] * x.astype(jnp.float32), final
    return fn


# Each case: (variant, shape, initial state?, input dtype, row block of the chunked driver or None for the
# plan's). Both variants see every shape, with and without an initial state, fp32 and bf16.
CASES = [("grid", "3_heads_per_group", True, "float32", None), ("grid", "1_head_per_group", False, "float32", None),
         ("grid", "head_dim_80", True, "bfloat16", None), ("grid", "state_256", False, "float32", None),
         ("chunked", "3_heads_per_group", False, "float32", 4), ("chunked", "1_head_per_group", True, "float32", None),
         ("chunked", "head_dim_80", False, "float32", 4), ("chunked", "head_dim_80", True, "bfloat16", None),
         ("chunked", "state_256", True, "float32", 8), ("chunked", "state_256", False, "bfloat16", 8)]


@pytest.mark.parametrize("variant, shape_name, with_state, dtype, rows", CASES,
                         ids=[f"{v}-{s}-{'initial' if w else 'zero'}_state-{d}" + (f"-rows{r}" if r else "")
                              for v, s, w, d, r in CASES])
def test_kernel_equals_the_xla_scan(variant, shape_name, with_state, dtype, rows):
    shape = SHAPES[shape_name]
    args = make_inputs(shape, jnp.dtype(dtype))
    if not with_state:
        del args["initial_state"]
    kernel = chunked_with_rows(rows) if rows else (lambda **a: ssd(variant=variant, **a))
    (y, state), grads = outputs_and_grads(kernel, args, shape[-1])
    (y_ref, state_ref), grads_ref = outputs_and_grads(ssd_chunked, args, shape[-1])
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert rel(y, y_ref) < tol
    assert rel(state, state_ref) < tol
    for name in args:
        assert grads[name].dtype == args[name].dtype, name
        assert rel(grads[name].astype(jnp.float32), grads_ref[name].astype(jnp.float32)) < tol, name


@pytest.mark.parametrize("cpu_variant", ["grid", "chunked"])
def test_model_with_pallas_ssd_equals_xla(hf_checkpoints, token_batch, monkeypatch, cpu_variant):
    """`ssm_impl="pallas"` (interpreted here) in the whole model, with either driver: logits and every
    parameter's gradient equal the XLA scan's. (Splash attention in the model: the next test.)"""
    monkeypatch.setitem(pallas.ssd.DEFAULT_VARIANTS, "cpu", cpu_variant)
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


# Lowering for the accelerators without one: Mosaic (TPU v5p) and Triton (H100), each named through an
# abstract device, which is also how the model picks its kernels for an ahead-of-time target. This runs JAX's
# whole kernel lowering (block shapes, tiling rules, every op the kernels use); only the backend's final
# compile, on the device, is left. (cuDNN attention cannot be lowered without cuDNN.)
def lowered_text(fn, args, platform: str) -> str:
    """The forward and backward of `fn(args)`, exported for `platform`."""
    def forward_and_backward(args):
        out, pullback = jax.vjp(fn, args)
        return out, pullback(jax.tree.map(jnp.ones_like, out))

    return export_text(forward_and_backward, (args,), platform)


# The Nemotron-H / Nemotron 3 widths, Nano 2's head_dim 80, and the 47B/56B's state 256.
@pytest.mark.parametrize("variant, platform, kernels", [("grid", "tpu", 3), ("chunked", "cuda", 8)])
@pytest.mark.parametrize("head_dim, state", [(64, 128), (80, 128), (64, 256)])
def test_ssd_kernels_lower_for_tpu_and_gpu(variant, platform, kernels, head_dim, state):
    b, l, h, g, q = 1, 300, 2, 1, 128
    args = dict(x=jnp.zeros((b, l, h, head_dim), jnp.bfloat16), dt=jnp.ones((b, l, h)), A=-jnp.ones((h,)),
                B=jnp.zeros((b, l, g, state), jnp.bfloat16), C=jnp.zeros((b, l, g, state), jnp.bfloat16),
                D=jnp.ones((h,)), initial_state=jnp.zeros((b, h, head_dim, state)))
    text = lowered_text(lambda a: ssd(chunk_size=q, **a), args, platform)  # the target's own driver
    # grid: the forward; the states pass and the backward. chunked: states, pass, scan; states, pass,
    # read-out cotangents, reverse pass, backward.
    assert text.count(CUSTOM_CALLS[platform]) == kernels


def test_splash_attention_lowers_for_tpu():
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    text = lowered_text(lambda a: splash_causal_attention(*a, interpret=False), (q, kv, kv), "tpu")
    assert text.count(CUSTOM_CALLS["tpu"]) >= 2  # forward and backward kernels


# ----- on-chip memory: every kernel's tile plan against every device we claim -----------------------------
RELEASED = sorted(pathlib.Path(__file__).parent.glob("fixtures/configs/*.json"))


@pytest.mark.parametrize("config", RELEASED, ids=[p.stem for p in RELEASED])
def test_every_released_config_has_kernel_plans_that_fit_on_chip(config):
    """For each release's (head_dim, state), chunk sizes 128 and 256, bf16 and fp32 compute: the GPU plan
    fits the shared memory of H100/H200/A100 and the TPU plan the scoped VMEM of v4/v5e/v5p/v6e."""
    cfg = ModelConfig.from_hf(json.loads(config.read_text()))
    for variant, devices in (("chunked", budget.GPU_SHARED_MEMORY), ("grid", budget.TPU_SCOPED_VMEM)):
        for chunk in (128, 256):
            for dtype in ("bfloat16", "float32"):
                plan = tile_plan(variant, chunk, cfg.mamba_head_dim, cfg.ssm_state_size, dtype)
                assert plan.devices == devices
                budget.check_plan(plan)
                assert max(plan.on_chip().values()) <= min(devices.values())


def test_an_oversized_tile_fails_the_budget():
    # The whole (256 x 256) chunk as one fp32 row block at state 256: ~1.3 MB of operands in one phase.
    oversized = ChunkedPlan(chunk=256, rows=256, head_dim=64, state=256, dtype="float32", interpret=False)
    with pytest.raises(budget.OnChipMemoryError, match=r"rows=256.*kernel '\w+' needs \d+ bytes on chip, H100 has 232448"):
        budget.check_plan(oversized)
    with pytest.raises(budget.OnChipMemoryError, match="TPU v4 has 16777216"):
        budget.check_plan(GridPlan(chunk=2048, head_dim=64, state=128, dtype="float32", interpret=False))
    # Callers get the check too: a chunk no row block fits, or a TPU chunk too large, fails before lowering.
    with pytest.raises(budget.OnChipMemoryError):
        tile_plan("grid", 2048, 64, 128, "float32")
    # A plan that does fit is the plan's own choice: the largest row block under the smallest GPU's limit.
    plan = tile_plan("chunked", 128, 64, 128, "bfloat16")
    assert plan.rows == 64 and max(plan.on_chip().values()) <= budget.GPU_PLAN_LIMIT
    whole_chunk = make_plan(128, 64, 128, "bfloat16", interpret=False, rows=128)
    assert whole_chunk.on_chip()["backward"] > plan.on_chip()["backward"]


# ----- a whole train step, lowered for the accelerators ---------------------------------------------------
def lowered_train_step(platform: str, ssm_impl: str, attention_impl: str, packed: bool = False,
                       precision: str = "bf16") -> str:
    """The project's train step for a small MoE hybrid (Mamba, attention, MoE blocks), exported; `packed`:
    with segment ids (SFT / DPO windows); `precision`: a low-precision recipe."""
    import flax.linen as nn

    from configs import base
    from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
    from nemojax.train.step import TrainState, train_step
    from tests.conftest import MODELS

    cfg = ModelConfig(**dict(MODELS["moe"], chunk_size=16), ssm_impl=ssm_impl, attention_impl=attention_impl,
                      precision=precision)
    model = NemotronH(cfg)
    opt = base.get_config().optimizer
    optimizer, schedule = make_optimizer(opt, 10), learning_rate_schedule(opt, 10)
    tokens = jnp.zeros((2, 32), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]))
    state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
    batch = {"tokens": jax.ShapeDtypeStruct(tokens.shape, jnp.int32), "mask": jax.ShapeDtypeStruct(tokens.shape, bool)}
    if packed:
        batch["segment_ids"] = jax.ShapeDtypeStruct(tokens.shape, jnp.int32)
    step = functools.partial(train_step, model, optimizer, grad_accum_steps=1, aux_loss_coef=1e-4,
                             bias_update_rate=1e-3, schedule=schedule)
    return export_text(step, (state, batch), platform)


@pytest.mark.parametrize("platform, ssm_impl, attention_impl, kernels, packed", [
    ("cuda", "auto", "xla", 2 * 8, True),  # auto: the chunked SSD kernels (cuDNN attention needs cuDNN to lower)
    ("tpu", "auto", "auto", 2 * 3 + 2, False),  # auto: the grid SSD kernels and splash attention
    ("tpu", "auto", "auto", 2 * 3 + 2, True),
    ("cpu", "xla", "xla", 0, False)])
def test_train_step_lowers_with_kernels_and_without_cpu_workarounds(platform, ssm_impl, attention_impl, kernels,
                                                                    packed):
    """Lowered for cuda or tpu, the train step holds the target's kernels (two Mamba layers' SSD, and splash
    on TPU; with packed documents too) and none of the XLA:CPU workarounds (`ops/platform.py`: the matmul
    VJP, ones-vector sums, the blocked grouped matmul), but ragged_dot; lowered for the CPU, it holds the
    workarounds."""
    text = lowered_train_step(platform, ssm_impl, attention_impl, packed)
    if platform == "cpu":
        assert CPU_ONLY in text and "ragged_dot" not in text
        return
    assert CPU_ONLY not in text
    assert "ragged_dot" in text
    count = text.count(CUSTOM_CALLS[platform])
    assert count == kernels if platform == "cuda" else count >= kernels
