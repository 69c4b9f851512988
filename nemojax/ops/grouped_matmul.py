"""Grouped matmul for dropless MoE: rows sorted by group, each group's rows times that group's matrix.

The contract is `jax.lax.ragged_dot`'s, which GPU and TPU compile to grouped GEMMs. XLA:CPU instead
expands it into a dense product of every row with every group's matrix, then masks: E times the work
(8.4x a plain matmul of the same rows at 8 experts). On the CPU, `blocked_grouped_matmul` pads each
group's rows to whole blocks, so every block belongs to one group, and a loop over the used blocks
multiplies each by its group's matrix. Its backward (`jax.custom_vjp`) is the same loop over the
cotangent, with the weight gradient accumulated block by block in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.ops.platform import on_cpu

BLOCK = 64  # rows per block; padding costs at most groups x (BLOCK - 1) rows of work


def grouped_matmul(x: Float[Array, "m k"], w: Float[Array, "g k n"],
                   group_sizes: Int[Array, " g"]) -> Float[Array, "m n"]:
    """`ragged_dot(x, w, group_sizes)`, lowered per platform: the blocked loop for the CPU."""
    return _grouped_matmul(x, w, group_sizes)


class _Layout:
    """Where rows go when each group is padded to whole blocks of `block` rows.

    slot_row: the row of x in each padded slot (`rows`, i.e. none, for padding);
    block_group: the group of each block; used_blocks: how many blocks hold rows;
    row_slot: each row's slot (past the end, i.e. none, for rows beyond the groups)."""

    def __init__(self, group_sizes: jax.Array, rows: int, block: int):
        groups = group_sizes.shape[0]
        self.blocks = -(-rows // block) + groups  # sum_g ceil(n_g / block) never exceeds this
        padded = (group_sizes + block - 1) // block * block
        padded_end, end = jnp.cumsum(padded), jnp.cumsum(group_sizes)
        padded_start, start = padded_end - padded, end - group_sizes

        slot = jnp.arange(self.blocks * block)
        slot_group = jnp.minimum(jnp.searchsorted(padded_end, slot, side="right"), groups - 1)
        within = slot - padded_start[slot_group]
        self.slot_row = jnp.where((slot < padded_end[-1]) & (within < group_sizes[slot_group]),
                                  start[slot_group] + within, rows)
        self.block_group = slot_group[::block]
        self.used_blocks = padded_end[-1] // block

        row = jnp.arange(rows)
        row_group = jnp.minimum(jnp.searchsorted(end, row, side="right"), groups - 1)
        self.row_slot = jnp.where(row < end[-1], padded_start[row_group] + row - start[row_group],
                                  self.blocks * block)


def _mesh_axes(*arrays: jax.Array) -> frozenset:
    """The mesh axes (inside `shard_map`) that any of `arrays` varies over."""
    return frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))


def _varying(value: jax.Array, axes: frozenset) -> jax.Array:
    """`value` made to vary over `axes` too, so that loop carries and custom_vjp cotangents agree in type
    inside `shard_map`; its transpose sums the gradient over those axes."""
    missing = tuple(sorted(axes - _mesh_axes(value)))
    return jax.lax.pcast(value, missing, to="varying") if missing else value


def _to_blocks(values: jax.Array, layout: _Layout, block: int) -> jax.Array:
    gathered = jnp.take(values, layout.slot_row, axis=0, mode="fill", fill_value=0)
    return gathered.reshape(layout.blocks, block, values.shape[1])


def _from_blocks(blocks: jax.Array, layout: _Layout) -> jax.Array:
    flat = blocks.reshape(-1, blocks.shape[-1])
    return jnp.take(flat, layout.row_slot, axis=0, mode="fill", fill_value=0)


def blocked_grouped_matmul(x: Float[Array, "m k"], w: Float[Array, "g k n"],
                           group_sizes: Int[Array, " g"]) -> Float[Array, "m n"]:
    """`ragged_dot`'s result (rows past the groups give zeros) with work only for each row's own group."""
    axes = _mesh_axes(x, w, group_sizes)
    return _blocked(_varying(x, axes), _varying(w, axes), _varying(group_sizes, axes))


@jax.custom_vjp
def _blocked(x, w, group_sizes):
    layout = _Layout(group_sizes, x.shape[0], BLOCK)
    xb = _to_blocks(x, layout, BLOCK)
    out_dtype = jnp.result_type(x, w)

    def block_product(j, yb):
        product = jnp.matmul(xb[j], w[layout.block_group[j]]).astype(out_dtype)
        return jax.lax.dynamic_update_index_in_dim(yb, product, j, 0)

    yb = jax.lax.fori_loop(0, layout.used_blocks, block_product,
                           _varying(jnp.zeros((layout.blocks, BLOCK, w.shape[2]), out_dtype), _mesh_axes(x)))
    return _from_blocks(yb, layout)


def _forward(x, w, group_sizes):
    return _blocked(x, w, group_sizes), (x, w, group_sizes)


def _backward(residuals, dy):
    x, w, group_sizes = residuals
    layout = _Layout(group_sizes, x.shape[0], BLOCK)
    xb, dyb = _to_blocks(x, layout, BLOCK), _to_blocks(dy, layout, BLOCK)

    def block_gradients(j, carry):
        dxb, dw = carry
        group = layout.block_group[j]
        dx_block = jnp.matmul(dyb[j], w[group].T).astype(dxb.dtype)
        dw_block = jnp.matmul(xb[j].T, dyb[j], preferred_element_type=jnp.float32)
        return (jax.lax.dynamic_update_index_in_dim(dxb, dx_block, j, 0),
                dw.at[group].add(dw_block))

    dxb, dw = jax.lax.fori_loop(0, layout.used_blocks, block_gradients,
                                tuple(_varying(jnp.zeros(shape, dtype), _mesh_axes(x))
                                      for shape, dtype in ((xb.shape, xb.dtype), (w.shape, jnp.float32))))
    return _from_blocks(dxb, layout), dw.astype(w.dtype), None


_blocked.defvjp(_forward, _backward)


_grouped_matmul = on_cpu(blocked_grouped_matmul, jax.lax.ragged_dot)


def pad_groups(arrays: tuple[jax.Array, ...], group_sizes: Int[Array, " g"], block: int
               ) -> tuple[tuple[jax.Array, ...], Int[Array, " g"]]:
    """Rows sorted by group, each group padded with zero rows to whole blocks of `block` (so a block never
    holds two groups' rows), and the padded group sizes. `block` 1: unchanged."""
    if block == 1:
        return arrays, group_sizes
    layout = _Layout(group_sizes, arrays[0].shape[0], block)
    padded = tuple(_to_blocks(a, layout, block).reshape(layout.blocks * block, a.shape[1]) for a in arrays)
    return padded, (group_sizes + block - 1) // block * block
