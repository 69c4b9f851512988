"""Where a train step's memory traffic goes, read from the program exported for a GPU (no device needed).

Exports the project's train step for CUDA (`jax.export`, with the GPU's Pallas SSD kernels; attention is
XLA's, as cuDNN's lowering needs cuDNN present)
at the accelerator issue's shapes (Nemotron-H-8B widths, the small config's 14-layer pattern, 2 x 4096
tokens, fp32 parameters, bf16 compute) and sums, per StableHLO op kind, how many ops there are and the
bytes of their results. That is the program before XLA's fusion, so the figures are upper bounds on
traffic; what they show is which non-matmul work scales with the parameter count (casts, the optimizer,
gradient accumulation) and how many transposes and copies the model asks for.

    python -m benchmarks.hlo_profile [--smoke] [--top 8]
"""

from __future__ import annotations

import argparse
import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import export_text, step_model

_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "ui32": 4, "i64": 8, "i1": 1, "i8": 1, "ui8": 1, "f64": 8}
_OP = re.compile(r"=\s+(?:\"?)(stablehlo\.[a-z_]+|func\.call|call)\b")
_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")


def result_types(line: str) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of the op's results: the tensor types after `->`, else the last type on the line."""
    types = _TENSOR.findall(line.split("->")[-1]) if "->" in line else _TENSOR.findall(line)[-1:]
    return [(tuple(int(d) for d in dims.split("x")[:-1]), dtype) for dims, dtype in types]


def profile(text: str, param_shapes: set[tuple[int, ...]]) -> dict[str, dict]:
    """{op kind: {"count", "bytes", "param_bytes", "largest": [(bytes, line)]}} over the exported module;
    `param_bytes` counts results shaped like a parameter (casts, gradients, the optimizer's updates)."""
    kinds: dict[str, dict] = collections.defaultdict(
        lambda: {"count": 0, "bytes": 0, "param_bytes": 0, "largest": []})
    for line in text.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        kind = match.group(1).removeprefix("stablehlo.")
        entry = kinds[kind]
        entry["count"] += 1
        size = 0
        for shape, dtype in result_types(line):
            nbytes = int(np.prod(shape or (1,))) * _BYTES.get(dtype, 4)
            size += nbytes
            if shape in param_shapes and int(np.prod(shape or (1,))) >= 1024:
                entry["param_bytes"] += nbytes
        entry["bytes"] += size
        entry["largest"].append((size, line.strip()[:160]))
    for entry in kinds.values():
        entry["largest"] = sorted(entry["largest"], reverse=True)[:3]
    return dict(kinds)


def step_text(smoke: bool, grad_accum_steps: int = 1) -> tuple[str, dict]:
    from configs import base
    from nemojax.checkpoint.loading import abstract_params
    from nemojax.model import NemotronH
    from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
    from nemojax.train.step import TrainState, train_step

    cfg, batch, seq = step_model(smoke, param_dtype="float32", dtype="bfloat16", ssm_impl="auto",
                                 attention_impl="xla")
    model = NemotronH(cfg)
    opt = base.get_config().optimizer
    optimizer, schedule = make_optimizer(opt, 1000), learning_rate_schedule(opt, 1000)
    params = abstract_params(cfg)
    state = jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
    data = {"tokens": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_)}
    step = functools.partial(train_step, model, optimizer, grad_accum_steps=grad_accum_steps, aux_loss_coef=0.0,
                             bias_update_rate=0.0, schedule=schedule)
    return export_text(step, (state, data), "cuda"), params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes")
    parser.add_argument("--top", type=int, default=8, help="op kinds to list, by bytes")
    args = parser.parse_args(argv)
    text, params = step_text(args.smoke)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    kinds = profile(text, {tuple(p.shape) for p in jax.tree.leaves(params)})
    print(f"train step exported for cuda: {len(text.splitlines())} lines, {n_params / 1e9:.2f}B parameters "
          f"({4 * n_params / 2**30:.1f} GiB in fp32)")
    print(f"{'op':24} {'count':>7} {'result GiB':>11} {'param-shaped GiB':>17}")
    for kind, entry in sorted(kinds.items(), key=lambda kv: -kv[1]["bytes"])[:args.top]:
        print(f"{kind:24} {entry['count']:>7} {entry['bytes'] / 2**30:>11.2f} {entry['param_bytes'] / 2**30:>17.2f}")
    param_bytes = sum(e["param_bytes"] for e in kinds.values())
    print(f"param-shaped results, all ops: {param_bytes / 2**30:.1f} GiB = {param_bytes / (4 * n_params):.1f} x the "
          f"fp32 parameters; written once and read once, {2 * param_bytes / 4.8e12 * 1e3:.0f} ms at an H200's "
          f"4.8 TB/s (before XLA fuses the elementwise chains)")
    for kind in ("transpose", "convert", "while"):
        for size, line in kinds.get(kind, {}).get("largest", []):
            print(f"  largest {kind}: {size / 2**20:.0f} MiB  {line}")
    return kinds


if __name__ == "__main__":
    main()
