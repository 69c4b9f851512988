"""Helpers shared by the benchmark scripts: medians of several runs, the matmul ceiling, and exporting a
function for an accelerator this machine does not have (GPU / TPU programs read on the CPU)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured rate of a large jitted square matmul: the ceiling model FLOP/s are compared against."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    seconds = median_seconds(lambda: f(a, b).block_until_ready(), repeats=repeats)
    return 2 * n**3 / seconds


# The custom calls Pallas kernels lower to, and the devices programs are exported for (jax.export).
CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
TARGETS = {"tpu": dict(device_kind="TPU v5p", num_cores=1, platform="tpu"),
           "cuda": dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")}


def export_text(fn: Callable, args: tuple, platform: str) -> str:
    """`fn(*args)` exported (StableHLO text) for `platform` under a one-device mesh with nemojax's axis
    names, so the trace picks that backend's kernels (nemojax.ops.platform.target_backend)."""
    from jax._src.mesh import AbstractDevice  # how JAX itself names a target device for AOT lowering

    from nemojax.sharding import MESH_AXES

    device = AbstractDevice(**TARGETS[platform]) if platform in TARGETS else None
    unchecked = [jax.export.DisabledSafetyCheck.custom_call(call) for call in CUSTOM_CALLS.values()]
    mesh = jax.sharding.AbstractMesh((1,) * len(MESH_AXES), MESH_AXES, abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=unchecked)(*args)
    return exported.mlir_module()


def step_model(smoke: bool, **runtime) -> tuple[object, int, int]:
    """(ModelConfig, batch, seq) of the accelerator issue's train step: Nemotron-H-8B widths with the small
    config's 14-layer pattern, 2 x 4096 tokens; `smoke`: tiny shapes for the CPU."""
    from configs import base
    from nemojax.config import ModelConfig

    if smoke:
        fields = dict(hybrid_override_pattern="M-*-", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
                      n_groups=2, vocab_size=512, chunk_size=16)
        batch, seq = 1, 64
    else:
        fields = dict(hybrid_override_pattern="M-M-M*-M-M-M*-", hidden_size=4096, num_attention_heads=32,
                      intermediate_size=21504, mamba_num_heads=128, max_position_embeddings=8192)
        batch, seq = 2, 4096
    return ModelConfig.from_hf(dict(base.RELEASED_MODEL_DEFAULTS, **fields), **runtime), batch, seq
