"""Per-device memory and FLOPs of a training config on its mesh, without allocating a single weight.

    python -m nemojax.plan --config configs/nemotron_h_8b.py --config.mesh.fsdp=8 [--device_memory_gib=80]
    python -m nemojax.plan --config configs/nemotron_3_nano_30b_a3b.py --config.mesh.fsdp=16 \\
        --config.mesh.expert=4 --nocompile

The mesh runs on simulated CPU devices (as many as the mesh needs; give --devices when an axis is -1).
Parameter, optimizer-state and gradient bytes come from the real sharded train state's shapes and
shardings (`jax.eval_shape`); activations and temporaries from XLA's memory analysis of the real train
step compiled for that mesh (`--nocompile` skips it for configs too large to compile quickly; then
activations are not reported).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "device count (needed when a mesh axis is -1)")
_MEMORY = flags.DEFINE_float("device_memory_gib", 80.0, "memory of one device, to say whether the plan fits")
_COMPILE = flags.DEFINE_bool("compile", True, "compile the step for XLA's memory analysis (activations)")
flags.mark_flags_as_required(["config"])

GIB = 2**30


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays): the largest shard."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def plan(config, compile_step: bool = True) -> dict[str, Any]:
    """The numbers `python -m nemojax.plan` prints, for a config whose mesh fits the devices JAX sees."""
    import jax
    import jax.numpy as jnp

    from nemojax.flops import train_flops
    from nemojax.model import NemotronH
    from nemojax.sharding import batch_sharding, make_mesh
    from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
    from nemojax.train.trainer import abstract_train_state, jitted_train_step, model_config

    cfg = model_config(config)
    model = NemotronH(cfg)
    mesh = make_mesh(config.mesh)
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    abstract, shardings = abstract_train_state(model, optimizer, mesh)
    devices = mesh.devices.size
    result = {
        "devices": devices,
        "mesh": dict(mesh.shape),
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
        "params_bytes": per_device_bytes(abstract.params),
        "optimizer_bytes": per_device_bytes(abstract.opt_state),
        "gradient_bytes": per_device_bytes(abstract.params),  # gradients take the parameters' shapes and shardings
        "flops_per_step": train_flops(cfg, config.batch_size, config.seq_len,
                                      with_mtp=config.mtp.loss_weight > 0) / devices,
    }
    if compile_step:
        batch_shape = (config.batch_size, config.seq_len)
        batch = {"tokens": jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=batch_sharding(mesh)),
                 "mask": jax.ShapeDtypeStruct(batch_shape, jnp.bool_, sharding=batch_sharding(mesh))}
        step = jitted_train_step(config, model, optimizer, learning_rate_schedule(config.optimizer,
                                                                                  config.total_steps),
                                 mesh, shardings)
        with jax.set_mesh(mesh):
            analysis = step.lower(abstract, batch).compile().memory_analysis()
        # XLA's temporaries: activations kept for the backward, gradients before the update, workspace.
        result["temp_bytes"] = int(analysis.temp_size_in_bytes)
        result["argument_bytes"] = int(analysis.argument_size_in_bytes)
        result["peak_bytes"] = int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                                   + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    return result


def describe(result: dict[str, Any], device_memory_gib: float) -> str:
    gib = lambda n: f"{n / GIB:10.2f} GiB"  # noqa: E731
    lines = [f"mesh {result['mesh']} ({result['devices']} devices), {result['parameters'] / 1e9:.2f}B parameters",
             "per device:",
             f"  parameters        {gib(result['params_bytes'])}",
             f"  optimizer state   {gib(result['optimizer_bytes'])}",
             f"  gradients         {gib(result['gradient_bytes'])}"]
    if "temp_bytes" in result:
        lines += [f"  activations + temporaries (XLA) {gib(result['temp_bytes'])}",
                  f"  peak (XLA: arguments + temporaries + outputs - aliased) {gib(result['peak_bytes'])}"]
        need = result["peak_bytes"]
    else:
        need = result["params_bytes"] + result["optimizer_bytes"] + result["gradient_bytes"]
        lines.append("  activations: not computed (--nocompile); the total below leaves them out")
    lines.append(f"  model FLOPs per step {result['flops_per_step'] / 1e12:.2f} TFLOP")
    verdict = "fits" if need <= device_memory_gib * GIB else "does NOT fit"
    lines.append(f"total {need / GIB:.2f} GiB per device: {verdict} in {device_memory_gib:g} GiB")
    return "\n".join(lines)


def _device_count(config) -> int:
    from nemojax.sharding import MESH_AXES  # importing JAX starts no backend: the device flags still apply

    sizes = [int(config.mesh[a]) for a in MESH_AXES]
    if -1 in sizes:
        if not _DEVICES.value:
            raise SystemExit("nemojax.plan: error: a mesh axis is -1: give --devices")
        return _DEVICES.value
    return math.prod(sizes)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    # Simulated CPU devices, set before JAX starts (it has not been imported yet in this process).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_device_count(config)}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from nemojax.config import ConfigError

    try:
        result = plan(config, compile_step=_COMPILE.value)
    except ConfigError as e:
        print(f"nemojax.plan: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(describe(result, _MEMORY.value))


if __name__ == "__main__":
    app.run(main)
