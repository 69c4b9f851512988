"""Per-device memory and FLOPs of a training config on its mesh, without allocating a single weight.

    python -m nemojax.plan --config configs/nemotron_h_8b.py --config.mesh.fsdp=8 [--device_memory_gib=80]
    python -m nemojax.plan --config configs/nemotron_3_nano_30b_a3b.py --config.mesh.fsdp=16 \\
        --config.mesh.expert=4 --nocompile

Long sequences (`--fit`): the step is compiled at two short lengths and its memory extrapolated
linearly; `--find_mesh=8,16,...` searches those slices, smallest first, for a mesh (fsdp, tensor,
sequence) that fits `config.seq_len`:

    python -m nemojax.plan --config configs/nemotron_3_nano_30b_a3b.py --config.seq_len=1048576 \
        --config.batch_size=1 --find_mesh=8,16,32,64,128 --device_memory_gib=141

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
_FIT = flags.DEFINE_bool("fit", False, "long sequences: compile at two short lengths and extrapolate linearly")
_FIND_MESH = flags.DEFINE_list("find_mesh", [], "device counts (slices) to search, smallest first, for a mesh that "
                               "fits config.seq_len; e.g. 8,16,32,64,128,256")
_TRIES = flags.DEFINE_integer("tries_per_slice", 2, "find_mesh: meshes compiled per slice at most")
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


def plan(config, compile_step: bool = True, fit: bool = False, devices: list | None = None) -> dict[str, Any]:
    """The numbers `python -m nemojax.plan` prints, for a config whose mesh fits `devices` (default: all
    the devices JAX sees). With `fit`, the step is compiled at two short sequence lengths instead of
    `config.seq_len` and its memory extrapolated linearly (`fit_lengths`)."""
    import jax

    from nemojax.flops import train_flops
    from nemojax.model import NemotronH
    from nemojax.sharding import make_mesh
    from nemojax.train.optimizer import make_optimizer
    from nemojax.train.trainer import abstract_train_state, model_config

    cfg = model_config(config)
    model = NemotronH(cfg)
    mesh = make_mesh(config.mesh, devices)
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    abstract, shardings = abstract_train_state(model, optimizer, mesh)
    result = {
        "devices": mesh.devices.size,
        "mesh": dict(mesh.shape),
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
        "params_bytes": per_device_bytes(abstract.params),
        "optimizer_bytes": per_device_bytes(abstract.opt_state),
        "gradient_bytes": per_device_bytes(abstract.params),  # gradients take the parameters' shapes and shardings
        "flops_per_step": train_flops(cfg, config.batch_size, config.seq_len,
                                      with_mtp=config.mtp.loss_weight > 0) / mesh.devices.size,
    }
    if not compile_step:
        return result
    if not fit:
        return result | compiled_memory(config, model, optimizer, mesh, abstract, shardings, config.seq_len)
    short, longer = fit_lengths(config)
    at = [compiled_memory(config, model, optimizer, mesh, abstract, shardings, n) for n in (short, longer)]
    # Every buffer of the step grows linearly with the sequence (each device's span, and the all-gathered
    # keys and values of the whole sequence): a line through two lengths extrapolates it.
    for key in at[0]:
        slope = (at[1][key] - at[0][key]) / (longer - short)
        result[key] = int(at[0][key] + slope * (config.seq_len - short))
    result["fitted_from"] = (short, longer)
    return result


def fit_lengths(config) -> tuple[int, int]:
    """Two short sequence lengths to compile a long-sequence step at: 1024 and 2048 tokens per sequence
    shard, so that every op keeps the layout (chunks, blocks, shard spans) it has at full length."""
    sequence = int(config.mesh.sequence)
    return 1024 * sequence, 2048 * sequence


def compiled_memory(config, model, optimizer, mesh, abstract, shardings, seq_len: int) -> dict[str, int]:
    """XLA's memory analysis of the train step compiled for `mesh` at `seq_len` tokens per sequence."""
    import jax
    import jax.numpy as jnp

    from nemojax.sharding import batch_sharding
    from nemojax.train.optimizer import learning_rate_schedule
    from nemojax.train.trainer import jitted_train_step

    batch_shape = (config.batch_size, seq_len)
    batch = {"tokens": jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=batch_sharding(mesh)),
             "mask": jax.ShapeDtypeStruct(batch_shape, jnp.bool_, sharding=batch_sharding(mesh))}
    step = jitted_train_step(config, model, optimizer, learning_rate_schedule(config.optimizer, config.total_steps),
                             mesh, shardings)
    with jax.set_mesh(mesh):
        analysis = step.lower(abstract, batch).compile().memory_analysis()
    # XLA's temporaries: activations kept for the backward, gradients before the update, workspace.
    return {"temp_bytes": int(analysis.temp_size_in_bytes),
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "peak_bytes": int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                              + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)}


def candidate_meshes(config, devices: int) -> list[dict[str, int]]:
    """Meshes of `devices` for a long-sequence run: the batch over fsdp (as far as it divides), heads over
    tensor (as far as every head count divides), the rest over sequence (dividing the sequence into whole
    1024-token spans); most sharded weights first."""
    from nemojax.train.trainer import model_config

    cfg = model_config(config)
    heads = [cfg.num_attention_heads, cfg.num_key_value_heads, cfg.mamba_num_heads, cfg.n_groups]
    meshes = []
    for tensor in (t for t in (1, 2, 4, 8) if all(h % t == 0 for h in heads) and devices % t == 0):
        for fsdp in (f for f in _divisors(devices // tensor) if config.batch_size % f == 0):
            sequence = devices // tensor // fsdp
            if config.seq_len % (1024 * sequence) == 0:
                meshes.append({"data": 1, "fsdp": fsdp, "tensor": tensor, "expert": 1, "sequence": sequence})
    return sorted(meshes, key=lambda m: (m["tensor"], -m["fsdp"]))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def find_mesh(config, slices: list[int], device_memory_gib: float, tries_per_slice: int = 2,
              log=lambda line: print(line, flush=True)) -> dict[str, Any] | None:
    """The smallest slice (device count) with a mesh whose fitted peak fits `device_memory_gib`: on each,
    the candidate meshes whose parameters, optimizer state and gradients fit are compiled (at most
    `tries_per_slice`) and extrapolated to `config.seq_len` (`plan(..., fit=True)`)."""
    import jax

    for devices in slices:
        tried = 0
        for sizes in candidate_meshes(config, devices):
            trial = config.copy_and_resolve_references()
            trial.mesh.update(sizes)
            static = plan(trial, compile_step=False, devices=jax.devices()[:devices])
            state = static["params_bytes"] + static["optimizer_bytes"] + static["gradient_bytes"]
            if state > device_memory_gib * GIB or tried == tries_per_slice:
                continue
            tried += 1
            result = plan(trial, fit=True, devices=jax.devices()[:devices])
            fits = result["peak_bytes"] <= device_memory_gib * GIB
            log(f"{devices} devices, mesh {_mesh_text(sizes)}: peak {result['peak_bytes'] / GIB:.1f} GiB per device "
                f"(weights, optimizer, gradients {state / GIB:.1f}): {'fits' if fits else 'does not fit'}")
            if fits:
                return result
    return None


def _mesh_text(sizes: dict[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1) or "one device"


def describe(result: dict[str, Any], device_memory_gib: float) -> str:
    gib = lambda n: f"{n / GIB:10.2f} GiB"  # noqa: E731
    lines = [f"mesh {result['mesh']} ({result['devices']} devices), {result['parameters'] / 1e9:.2f}B parameters",
             "per device:",
             f"  parameters        {gib(result['params_bytes'])}",
             f"  optimizer state   {gib(result['optimizer_bytes'])}",
             f"  gradients         {gib(result['gradient_bytes'])}"]
    if "temp_bytes" in result:
        if "fitted_from" in result:
            lines.append("  (XLA's analysis at {} and {} tokens, extrapolated linearly)".format(*result["fitted_from"]))
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

    if _FIND_MESH.value:
        return max(int(n) for n in _FIND_MESH.value)
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
        if _FIND_MESH.value:
            result = find_mesh(config, sorted(int(n) for n in _FIND_MESH.value), _MEMORY.value, _TRIES.value)
            if result is None:
                print(f"no mesh of {', '.join(_FIND_MESH.value)} devices fits {config.seq_len} tokens in "
                      f"{_MEMORY.value:g} GiB per device")
                sys.exit(1)
        else:
            result = plan(config, compile_step=_COMPILE.value, fit=_FIT.value)
    except ConfigError as e:
        print(f"nemojax.plan: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(describe(result, _MEMORY.value))


if __name__ == "__main__":
    app.run(main)
