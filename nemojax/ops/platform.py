"""The one switch between XLA:CPU workarounds and the plain ops that GPUs and TPUs get.

nemojax was first tuned on a 2-core CPU, where a few rewrites pay. Each lives next to the op it replaces:
- `ops/matmul.py`: a hand-written matmul VJP that transposes the cheaper side explicitly (XLA:CPU fuses
  producers into a strided transpose, ~25x a plain one);
- `ops/sums.py`: float32 sums as ones-vector products (XLA:CPU reduces major axes slowly);
- `ops/grouped_matmul.py`: the experts' matmul in blocks (XLA:CPU computes `ragged_dot` densely);
- `ops/conv.py`: a time-blocked conv backward; `ops/ssd.py`: the in-chunk cumsum as a triangular product.
Each is written as `on_cpu(workaround, plain)`: the
choice is made when the program is lowered (`jax.lax.platform_dependent`), so a program lowered for cuda
or tpu holds only the plain op. Workarounds run under the name scope `CPU_ONLY`, which the tests look for
in lowered programs (present for the CPU, absent for cuda and tpu).
"""

from __future__ import annotations

from typing import Callable

import jax

CPU_ONLY = "cpu_only"


def target_backend() -> str:
    """The backend a trace is for: "cpu", "gpu" or "tpu". The current abstract mesh's device when it names
    one (ahead-of-time lowering for another machine, as in the tests' jax.export for cuda and tpu), else
    JAX's default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None:
        return jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(device.platform, device.platform)


def on_cpu(workaround: Callable, plain: Callable) -> Callable:
    """`workaround(*arrays)` when lowered for the CPU, `plain(*arrays)` on every other platform."""
    def scoped(*arrays):
        with jax.named_scope(CPU_ONLY):
            return workaround(*arrays)

    def choose(*arrays):
        return jax.lax.platform_dependent(*arrays, cpu=scoped, default=plain)

    return choose
