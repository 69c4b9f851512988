"""The accelerator check, in one command: compiled SSD kernels against the XLA scan, SSD throughput, and the
train step at Nemotron-H-8B widths. Prints each result and writes them all as JSON.

    python -m benchmarks.accelerator [--out accelerator.json]      # on one GPU (or TPU): < 5 minutes
    python -m benchmarks.accelerator --smoke                       # on the CPU: tiny shapes, interpreted

1. Correctness: `pallas/ssd.py` (the backend's driver, compiled) against `nemojax/ops/ssd.py`, fp32 and bf16,
   on a shape whose length is not a multiple of the chunk, with an initial state: y, final state, and
   every input's gradient (relative errors; fp32 must be < 1e-5, bf16 < 2e-2).
2. SSD throughput at Nemotron-H-8B shapes (128 heads x 64, state 128, 8 groups, chunk 128, bf16 x/B/C):
   forward and forward+backward of the XLA scan and the kernels at 1 x 8192 and 8 x 8192 tokens; also
   mamba_ssm's Triton `mamba_chunk_scan_combined` on the same inputs when mamba_ssm and torch (CUDA)
   import (install it with MAMBA_SKIP_CUDA_BUILD=TRUE).
3. Train step: the 8B widths with the `small` config's 14-layer pattern, 2 x 4096 tokens, fp32 params +
   AdamW, bf16 compute, no remat; for the XLA paths and for the kernels (pallas SSD, the backend's attention:
   the "auto" defaults on a GPU or TPU).
   Step time (median), tokens/s, model TFLOP/s and MFU against the device's dense bf16 peak, compile
   time, and XLA's temp memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import median_seconds, step_model
from nemojax.ops.ssd import ssd_chunked
from pallas.ssd import ssd as ssd_kernels

SSD_8B = dict(heads=128, head_dim=64, groups=8, state=128, chunk=128)
SSD_SMOKE = dict(heads=4, head_dim=16, groups=2, state=16, chunk=16)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def ssd_inputs(batch: int, length: int, shape: dict, dtype, initial_state: bool = False) -> dict:
    k = jax.random.split(jax.random.key(0), 7)
    h, p, g, n = shape["heads"], shape["head_dim"], shape["groups"], shape["state"]
    args = dict(x=jax.random.normal(k[0], (batch, length, h, p)).astype(dtype),
                dt=jax.nn.softplus(jax.random.normal(k[1], (batch, length, h)) - 2.0),
                A=-jnp.exp(0.5 * jax.random.normal(k[2], (h,))),
                B=jax.random.normal(k[3], (batch, length, g, n)).astype(dtype),
                C=jax.random.normal(k[4], (batch, length, g, n)).astype(dtype),
                D=jax.random.normal(k[5], (h,)))
    if initial_state:
        args["initial_state"] = jax.random.normal(k[6], (batch, h, p, n))
    return args


def objective(impl, chunk: int):
    """A scalar of y and the final state with fixed random weights: its gradient reaches every input."""
    def f(args):
        y, state = impl(chunk_size=chunk, **args)
        wy = jax.random.normal(jax.random.key(1), y.shape)
        ws = jax.random.normal(jax.random.key(2), state.shape)
        return jnp.sum(y * wy) + jnp.sum(state * ws), (y, state)
    return f


def correctness(smoke: bool) -> list[dict]:
    shape = SSD_SMOKE if smoke else dict(SSD_8B, heads=16)
    rows = []
    for dtype in ("float32", "bfloat16"):
        args = ssd_inputs(2, 3 * shape["chunk"] + 37, shape, jnp.dtype(dtype), initial_state=True)
        results = {}
        for name, impl in (("kernels", ssd_kernels), ("xla", ssd_chunked)):
            (_, (y, state)), grads = jax.jit(jax.value_and_grad(objective(impl, shape["chunk"]), has_aux=True))(args)
            results[name] = (y, state, grads)
        (y, state, grads), (y_ref, state_ref, grads_ref) = results["kernels"], results["xla"]
        errors = {"y": rel(y, y_ref), "final_state": rel(state, state_ref)}
        errors.update({f"d{k}": rel(grads[k].astype(jnp.float32), grads_ref[k].astype(jnp.float32)) for k in args})
        row = dict(dtype=dtype, errors=errors, tolerance=TOLERANCE[dtype],
                   ok=all(e < TOLERANCE[dtype] for e in errors.values()))
        print("correctness", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def mamba_ssm_impl():
    """mamba_ssm's Triton SSD on the same inputs (through torch, CUDA only), or None."""
    try:
        import torch
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        print(f"mamba_ssm not available: {e!r:.200}", flush=True)
        return None
    if not torch.cuda.is_available():
        return None

    def to_torch(a):
        t = torch.from_dlpack(a)
        return t.detach().requires_grad_(t.is_floating_point())

    def run(args, chunk, backward):
        t = {k: to_torch(v) for k, v in args.items()}
        y = mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"])
        if backward:
            y.float().sum().backward()
        torch.cuda.synchronize()
    return run


def throughput(smoke: bool) -> list[dict]:
    shape = SSD_SMOKE if smoke else SSD_8B
    sizes = [(1, 64)] if smoke else [(1, 8192), (8, 8192)]
    mamba = None if smoke else mamba_ssm_impl()
    rows = []
    for batch, length in sizes:
        args = ssd_inputs(batch, length, shape, jnp.bfloat16)
        for name, impl in (("xla", ssd_chunked), ("kernels", ssd_kernels)):
            forward = jax.jit(lambda a, impl=impl: impl(chunk_size=shape["chunk"], **a))
            both = jax.jit(jax.grad(lambda a, impl=impl: jnp.sum(impl(chunk_size=shape["chunk"], **a)[0])))
            for direction, fn in (("forward", forward), ("forward+backward", both)):
                seconds = median_seconds(lambda fn=fn: jax.block_until_ready(fn(args)), repeats=1 if smoke else 10)
                rows.append(dict(impl=name, direction=direction, batch=batch, length=length, ms=seconds * 1e3,
                                 tokens_per_s=batch * length / seconds))
                print("ssd", json.dumps(rows[-1]), flush=True)
        if mamba is not None:
            for direction in ("forward", "forward+backward"):
                seconds = median_seconds(lambda d=direction: mamba(args, shape["chunk"], d != "forward"), repeats=10)
                rows.append(dict(impl="mamba_ssm", direction=direction, batch=batch, length=length,
                                 ms=seconds * 1e3, tokens_per_s=batch * length / seconds))
                print("ssd", json.dumps(rows[-1]), flush=True)
    return rows


def train_step_row(smoke: bool, ssm_impl: str, attention_impl: str) -> dict:
    import flax.linen as nn

    from configs import base
    from nemojax.flops import train_flops
    from nemojax.model import NemotronH
    from nemojax.train.metrics import device_peak_flops
    from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
    from nemojax.train.step import TrainState, train_step

    compute = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    cfg, batch, seq = step_model(smoke, param_dtype="float32", dtype=compute, ssm_impl=ssm_impl,
                                 attention_impl=attention_impl)
    model = NemotronH(cfg)
    opt = base.get_config().optimizer
    optimizer, schedule = make_optimizer(opt, 1000), learning_rate_schedule(opt, 1000)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    data = {"tokens": jnp.asarray(tokens), "mask": jnp.ones(tokens.shape, bool)}
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), data["tokens"][:, :8])["params"])
    step = jax.jit(functools.partial(train_step, model, optimizer, grad_accum_steps=1, aux_loss_coef=0.0,
                                     bias_update_rate=0.0, schedule=schedule), donate_argnums=0)
    state = [TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))]
    del params
    start = time.perf_counter()
    compiled = step.lower(state[0], data).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def one_step():
        state[0], metrics = compiled(state[0], data)
        jax.block_until_ready(metrics)

    seconds = median_seconds(one_step, repeats=1 if smoke else 6, warmup=1 if smoke else 2)  # smoke: it runs
    flops = train_flops(cfg, batch, seq)
    peak = device_peak_flops()
    impls = cfg.kernel_impls()
    row = dict(ssm_impl=f"{ssm_impl} -> {impls[0]}", attention_impl=f"{attention_impl} -> {impls[1]}",
               batch=batch, seq=seq, step_s=seconds, tokens_per_s=batch * seq / seconds, tflops=flops / seconds / 1e12,
               mfu=flops / seconds / peak if peak else None, compile_s=compile_s,
               temp_gib=memory.temp_size_in_bytes / 2**30 if memory is not None else None)
    print("train_step", json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for the CPU (kernels interpreted)")
    parser.add_argument("--out", default="accelerator.json", help="where the JSON results go")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: correctness,ssd,train_step")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    device = jax.devices()[0]
    results = {"jax": jax.__version__, "backend": jax.default_backend(), "device": device.device_kind,
               "smoke": args.smoke}
    print("device", json.dumps(results), flush=True)
    if "correctness" not in skip:
        results["correctness"] = correctness(args.smoke)
    if "ssd" not in skip:
        results["ssd"] = throughput(args.smoke)
    if "train_step" not in skip:
        # The XLA paths, then the kernels: pallas SSD with the backend's attention (on a GPU or TPU, exactly the
        # "auto" defaults; on the CPU the SSD kernels run interpreted, so the smoke run exercises them).
        results["train_step"] = [train_step_row(args.smoke, "xla", "xla"), train_step_row(args.smoke, "pallas", "auto")]
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
