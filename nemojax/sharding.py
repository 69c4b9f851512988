"""Meshes and the logical-axis rules: the one place that decides how arrays are laid out on devices.

Parameters carry logical axis names (`embed`, `heads`, `experts`, ...; see `layers/common.py::param`);
`LOGICAL_RULES` maps each to mesh axes, so one model definition runs on 1 CPU, a GPU node or a pod slice.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")
EXPERT_AXIS = "expert"  # routed experts are split over it (layers/moe.py's expert-parallel exchange)
SEQUENCE_AXIS = "sequence"  # activations' time axis is split over it (ops/sequence_parallel.py)
BATCH_AXES = ("data", "fsdp", EXPERT_AXIS)  # the axes a batch is split over

# logical axis -> mesh axis (or axes); names not listed are replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", SEQUENCE_AXIS),  # context parallelism: each device holds a contiguous span of the sequence
    ("act_embed", None),
    ("embed", ("fsdp", SEQUENCE_AXIS)),  # sequence shards also split the weights, as in MaxText: one long
    #                                     sequence (batch 1) leaves fsdp at 1, and its devices need the room
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_groups", "tensor"),
    ("experts", "expert"),
    ("moe_mlp", "tensor"),
    ("layers", None),  # the stacked axis of scanned layer runs (nemojax/scan_layers.py): no pipeline stages
)


def mesh_shape(sizes: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Resolve one -1 ("the remaining devices") in `sizes`; the product must equal `device_count`."""
    sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    unknown = [axis for axis, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ConfigError(f"config field `mesh`: at most one axis may be -1, got {unknown}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if device_count % known:
            raise ConfigError(f"config field `mesh` = {sizes}: {device_count} devices do not divide by {known}")
        sizes[unknown[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        raise ConfigError(f"config field `mesh` = {sizes}: needs {math.prod(sizes.values())} devices, "
                         f"have {device_count}")
    return sizes


def expert_axis_size() -> int:
    """Devices along the expert axis of the mesh being traced under (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(EXPERT_AXIS, 1)


def sequence_axis_size() -> int:
    """Devices along the sequence axis of the mesh being traced under (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(SEQUENCE_AXIS, 1)


def smallest_batch(mesh: Mesh, length: int = 8) -> tuple[int, int]:
    """The smallest [batch, length] token shape every device gets a piece of (the per-shard ops need one):
    initialising a model under `mesh` traces it on this."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES), length * mesh.shape[SEQUENCE_AXIS]


def check_expert_mesh(mesh: Mesh, cfg) -> None:
    """Each device holds whole experts: the expert axis must divide the routed experts."""
    expert = mesh.shape[EXPERT_AXIS]
    if expert > 1 and cfg.has_moe and cfg.n_routed_experts % expert:
        raise ConfigError(f"config field `mesh.expert` = {expert}: must divide model.n_routed_experts = "
                          f"{cfg.n_routed_experts} (each device holds whole experts)")


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape([shape[a] for a in MESH_AXES]), MESH_AXES)


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of (abstract) parameters boxed with logical axis names."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def constrain_activations(x: jax.Array) -> jax.Array:
    """Pin [batch, length, embed] activations between blocks to the batch sharding (inside a mesh
    context; a no-op outside one), so the partitioner never carries a weight's layout into them."""
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"), rules=LOGICAL_RULES)


def shard_map_logical(fn: Callable, in_axes: Sequence[tuple | None], out_axes: tuple | list[tuple]) -> Callable:
    """`fn` run once per shard under the current mesh (`jax.shard_map`) with specs from logical axis
    names: `in_axes` one per argument (None: replicated), `out_axes` the output's, or a list of them when
    `fn` returns a tuple. Without a mesh, `fn` itself. For kernels, which see one device's shard."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn

    def spec(axes):
        return PartitionSpec() if axes is None else nn.logical_to_mesh_axes(axes, LOGICAL_RULES)

    out_specs = tuple(map(spec, out_axes)) if isinstance(out_axes, list) else spec(out_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(spec, in_axes)), out_specs=out_specs,
                         check_vma=False)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, ...] arrays split over every data-parallel axis."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), LOGICAL_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
