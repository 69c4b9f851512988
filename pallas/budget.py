"""On-chip memory of the accelerators nemojax claims, and the one check every kernel's tile plan passes.

A kernel whose tiles do not fit fails at compile time on the device (Triton: "Shared memory size limit
exceeded"; Mosaic: a scoped VMEM overflow). Each kernel module computes what its plan stages on chip
(its plan's `on_chip()`: shared memory for Triton kernels, VMEM for Mosaic ones); `check_plan` compares
that against these limits, so an oversized tile fails a CPU test instead of a user's first run.
"""

from __future__ import annotations

from typing import Any

KIB, MIB = 1024, 1024 * 1024

# Largest dynamic shared memory one thread block may use (CUDA's opt-in maximum per block).
GPU_SHARED_MEMORY = {
    "H100": 227 * KIB,  # = 232448: the "available" figure of the H200 compile error that started issue 16
    "H200": 227 * KIB,
    "A100": 163 * KIB,
}
# The scoped VMEM a Mosaic kernel gets without raising `vmem_limit_bytes` (XLA's default scoped limit;
# physical VMEM is larger: 128 MiB on v5e and v6e, 64 MiB on v5p, 16 MiB on v4).
TPU_SCOPED_VMEM = {
    "TPU v4": 16 * MIB,
    "TPU v5e": 16 * MIB,
    "TPU v5p": 16 * MIB,
    "TPU v6e": 32 * MIB,
}
GPU_PLAN_LIMIT = min(GPU_SHARED_MEMORY.values())  # plans are sized to fit every GPU above
TPU_PLAN_LIMIT = min(TPU_SCOPED_VMEM.values())


class OnChipMemoryError(ValueError):
    """A kernel's tiles do not fit the on-chip memory of a device we claim."""


def check_plan(plan: Any) -> None:
    """Raise `OnChipMemoryError` naming the first kernel of `plan` (an object with `on_chip()` -> bytes per
    kernel and `devices`: device -> limit) that does not fit one of its devices."""
    for device, limit in plan.devices.items():
        for kernel, used in plan.on_chip().items():
            if used > limit:
                raise OnChipMemoryError(f"{plan}: kernel {kernel!r} needs {used} bytes on "
                                        f"chip, {device} has {limit}")
