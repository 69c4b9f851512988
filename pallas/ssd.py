"""Fused Mamba-2 SSD scan (Pallas): the kernel twin of `nemojax.ops.ssd.ssd_chunked`.

Two drivers, one per accelerator family, chosen from the backend:
- "chunked" (GPU, Triton: `pallas/ssd_chunked.py`): chunk-parallel kernels, parallel over (batch, chunk,
  head) with a small sequential pass over chunk states, bf16 dot operands, fp32 accumulation.
- "grid" (TPU, Mosaic: `pallas/ssd_grid.py`): one grid step per (batch, head, chunk), chunks sequential,
  the running state in VMEM.
On the CPU both run with `interpret=True` ("grid" unless asked), which is how the tests check them against
the XLA scan. `tile_plan` is the one place a call's tile sizes are decided; each plan's `on_chip()` is
what `pallas/budget.py` checks against the devices we claim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.ops.platform import target_backend
from pallas import budget
from pallas.ssd_chunked import make_plan, ssd_chunked_kernels
from pallas.ssd_common import document_starts
from pallas.ssd_grid import GridPlan, ssd_grid_kernels

f32 = jnp.float32
VARIANTS = ("grid", "chunked")
DEFAULT_VARIANTS = {"gpu": "chunked", "tpu": "grid", "cpu": "grid"}  # by target backend


def ssd(
    x: Float[Array, "b l h p"],
    dt: Float[Array, "b l h"],
    A: Float[Array, " h"],
    B: Float[Array, "b l g n"],
    C: Float[Array, "b l g n"],
    chunk_size: int,
    D: Float[Array, " h"] | None = None,
    initial_state: Float[Array, "b h p n"] | None = None,
    segment_ids: Int[Array, "b l"] | None = None,
    *,
    variant: str | None = None,
    interpret: bool | None = None,
) -> tuple[Float[Array, "b l h p"], Float[Array, "b h p n"]]:
    """Same contract as `ssd_chunked`: (y in fp32, final state), packed documents (`segment_ids`) kept
    apart. `variant` and `interpret` default from the target backend: "chunked" on GPU, "grid" on TPU,
    "grid" interpreted on the CPU."""
    backend = target_backend()
    variant = variant or DEFAULT_VARIANTS.get(backend, "grid")
    interpret = backend not in ("tpu", "gpu") if interpret is None else interpret
    b, _, h, p = x.shape
    n = B.shape[-1]
    plan = tile_plan(variant, chunk_size, p, n, x.dtype, interpret)
    init = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state
    kernels = ssd_chunked_kernels if variant == "chunked" else ssd_grid_kernels
    y, final = kernels(x, dt, A, B, C, init, document_starts(segment_ids, x.shape[:2]), plan)
    if D is not None:
        y = y + D.astype(f32)[:, None] * x.astype(f32)
    return y, final


def tile_plan(variant: str, chunk: int, head_dim: int, state: int, dtype, interpret: bool = False):
    """The static tile plan of one call. A compiled (not interpreted) plan must fit the on-chip memory of
    every device of its family (`budget.check_plan`), or this raises `budget.OnChipMemoryError`."""
    if variant not in VARIANTS:
        raise ValueError(f"pallas ssd: variant {variant!r} is not one of {VARIANTS}")
    if variant == "chunked":
        plan = make_plan(chunk, head_dim, state, dtype, interpret)
    else:
        plan = GridPlan(chunk, head_dim, state, jnp.dtype(dtype).name, interpret)
    if not interpret:
        budget.check_plan(plan)
    return plan
