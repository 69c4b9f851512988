"""Mixture of experts (the `E` block): sigmoid router, dropless routed experts, shared expert, LatentMoE.

Routing (Nemotron 3): fp32 sigmoid scores; a correction bias (aux-loss-free balancing, updated outside
the optimizer) changes only *which* experts are chosen; group-limited top-k; the combine weights are
the unbiased scores of the chosen experts, optionally normalised, times `routed_scaling_factor`.
Experts run dropless: assignments are sorted by expert and multiplied group by group
(`ops/grouped_matmul.py`: `jax.lax.ragged_dot` on GPU and TPU, a blocked loop on the CPU).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.config import ModelConfig
from nemojax.layers.common import Gemm, Gemms, normal, param, projection
from nemojax.layers.mlp import MLP, relu2
from nemojax.ops.platform import target_backend
from nemojax.sharding import (BATCH_AXES, EXPERT_AXIS, LOGICAL_RULES, SEQUENCE_AXIS, expert_axis_size,
                              sequence_axis_size)


def route(cfg: ModelConfig, logits: Float[Array, "t e"], correction_bias: Float[Array, " e"]
          ) -> tuple[Float[Array, "t k"], Int[Array, "t k"]]:
    """Pick `num_experts_per_tok` experts per token; returns (combine weights, expert ids)."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + correction_bias.astype(jnp.float32)
    if cfg.n_group > 1:  # keep only the `topk_group` groups whose two best experts score highest
        tokens, experts = choice.shape
        grouped = choice.reshape(tokens, cfg.n_group, experts // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, best_groups = jax.lax.top_k(group_scores, cfg.topk_group)
        keep = jax.nn.one_hot(best_groups, cfg.n_group, dtype=bool).any(axis=1)
        choice = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(tokens, experts)
    _, expert_ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    weights = jnp.take_along_axis(scores, expert_ids, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, expert_ids


def sequence_balance_loss(logits: Float[Array, "b l e"], expert_ids: Int[Array, "b l k"]) -> Float[Array, ""]:
    """Sequence-level balance loss (DeepSeek-V3 style), averaged over sequences:
    sum_i f_i P_i with f_i = E / (K L) x (tokens of the sequence routed to expert i) and
    P_i = the sequence's mean of expert i's normalised sigmoid score. Minimal (1) when loads are uniform."""
    experts, top_k, length = logits.shape[-1], expert_ids.shape[-1], logits.shape[1]
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    probs = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)  # [b e]
    counts = jnp.sum(jax.nn.one_hot(expert_ids, experts, dtype=jnp.float32), axis=(1, 2))  # [b e]
    load = jax.lax.stop_gradient(counts * experts / (top_k * length))
    return jnp.mean(jnp.sum(load * probs, axis=-1))


def routed_experts(x: Float[Array, "t d"], weights: Float[Array, "t k"], expert_ids: Int[Array, "t k"],
                   up: Float[Array, "e d f"], down: Float[Array, "e f d"], gemms: tuple[Gemm, Gemm] = (Gemm(), Gemm())
                   ) -> Float[Array, "t d"]:
    """Dropless expert MLPs: sort the (token, slot) assignments by expert, grouped matmuls (in the up and
    down projections' formats, `gemms`), scatter back."""
    tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token_of = order // top_k
    group_sizes = jnp.bincount(flat_ids, length=up.shape[0]).astype(jnp.int32)
    hidden = relu2(gemms[0].grouped(x[token_of], up, group_sizes))
    out = gemms[1].grouped(hidden, down, group_sizes)
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens, x.shape[-1]), jnp.float32).at[token_of].add(out)


RAGGED_EXCHANGE_BACKENDS = ("gpu", "tpu")  # where XLA implements `ragged_all_to_all` (not XLA:CPU)


def expert_parallel_experts(x: Float[Array, "t d"], weights: Float[Array, "t k"], expert_ids: Int[Array, "t k"],
                            up: Float[Array, "e d f"], down: Float[Array, "e f d"],
                            gemms: tuple[Gemm, Gemm] = (Gemm(), Gemm()), axis: str = EXPERT_AXIS,
                            batch_axes: tuple[str, ...] = BATCH_AXES,
                            weight_axes: tuple[tuple, tuple] | None = None) -> Float[Array, "t d"]:
    """`routed_experts` with the experts split over mesh axis `axis` (inside a mesh context): each
    device sends every (token, slot) assignment to the device holding its expert, runs only its own
    experts on what it receives, and sends the results back. Dropless either way:

    - on GPU and TPU, a ragged all-to-all (`_ragged_exchange`) moves exactly the assignments;
    - on the CPU (no `ragged_all_to_all` in XLA:CPU), a padded all-to-all (`_padded_exchange`) where every
      send buffer has room for all of a device's assignments: memory and traffic, not exactness.
    The receive buffer holds `devices` x the local assignments either way (the worst case: every
    assignment in the mesh choosing this device's experts).

    `weight_axes`: the logical axes of `up` and `down`. Given, the weights enter split as the rules say and
    each device all-gathers its experts' other dimensions inside, so their gradients leave reduce-scattered
    (entering replicated, they would come back as whole, summed copies on every device).
    """
    ragged = target_backend() in RAGGED_EXCHANGE_BACKENDS

    def local(x, weights, expert_ids, up, down):
        up, down = (_gathered_beyond_experts(w, spec) for w, spec in ((up, up_spec), (down, down_spec)))
        devices, experts_here = jax.lax.axis_size(axis), up.shape[0]
        flat_ids = expert_ids.reshape(-1)
        destination = flat_ids // experts_here
        order = jnp.argsort(destination, stable=True)  # assignments grouped by destination device
        counts = jnp.bincount(destination, length=devices)
        token_of = order // expert_ids.shape[1]
        exchange = (_ragged_exchange if ragged else _padded_exchange)(axis, devices, counts, destination[order])
        recv_x = exchange.there(x[token_of], 0)
        # the expert's index on its device; rows nobody filled read `experts_here`: no expert
        recv_e = exchange.there(flat_ids[order] - destination[order] * experts_here, experts_here)
        by_expert = jnp.argsort(recv_e, stable=True)
        group_sizes = jnp.bincount(recv_e, length=experts_here + 1)[:experts_here].astype(jnp.int32)
        hidden = relu2(gemms[0].grouped(recv_x[by_expert], up, group_sizes))
        out = gemms[1].grouped(hidden, down, group_sizes)
        out = jnp.where((recv_e[by_expert] < experts_here)[:, None], out, 0)  # rows past the groups
        back = exchange.back(jnp.zeros_like(out).at[by_expert].set(out))
        combined = back.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
        return jnp.zeros((x.shape[0], x.shape[1]), jnp.float32).at[token_of].add(combined)

    # Tokens stay where the batch sharding put them (split over every data-parallel axis); each device
    # gathers its experts' weights whole (FSDP / tensor shards) at the boundary.
    P = jax.sharding.PartitionSpec
    tokens = P(batch_axes)
    if weight_axes is None:
        up_spec = down_spec = P(axis)
    else:
        up_spec, down_spec = (nn.logical_to_mesh_axes(axes, LOGICAL_RULES) for axes in weight_axes)
    return jax.shard_map(local, in_specs=(tokens, tokens, tokens, up_spec, down_spec), out_specs=tokens,
                         check_vma=False)(x, weights, expert_ids, up, down)


def _gathered_beyond_experts(w: jax.Array, spec) -> jax.Array:
    """A device's experts' weights whole: every dimension but the first (experts) all-gathered over the
    mesh axes `spec` splits it on."""
    for dim, axes in enumerate(spec):
        if dim > 0 and axes is not None:
            w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return w


class _Exchange(NamedTuple):
    """`there`: this device's rows, sorted by destination, to a [devices x rows] receive buffer (unused
    rows hold `fill`); `back`: rows of that buffer to where they came from, in the sorted order."""

    there: Callable[[jax.Array, Any], jax.Array]
    back: Callable[[jax.Array], jax.Array]


def _padded_exchange(axis: str, devices: int, counts: jax.Array, sorted_dest: jax.Array) -> _Exchange:
    """A block of `rows` slots per destination, filled from the front; two dense all-to-alls."""
    rows = sorted_dest.shape[0]
    slot = jnp.arange(rows) - (jnp.cumsum(counts) - counts)[sorted_dest]

    def there(values, fill):
        blocks = jnp.full((devices, rows, *values.shape[1:]), fill, values.dtype).at[sorted_dest, slot].set(values)
        return jax.lax.all_to_all(blocks, axis, 0, 0).reshape(devices * rows, *values.shape[1:])

    def back(values):
        return jax.lax.all_to_all(values.reshape(devices, rows, *values.shape[1:]), axis, 0, 0)[sorted_dest, slot]

    return _Exchange(there, back)


def _ragged_exchange(axis: str, devices: int, counts: jax.Array, sorted_dest: jax.Array) -> _Exchange:
    """Exactly the assignments move. `sent[s, j]`: assignments device s sends to device j (all-gathered);
    device j receives from s at offset sum_{s' < s} sent[s', j], and each sender says where its rows go."""
    rows = sorted_dest.shape[0]
    me = jax.lax.axis_index(axis)
    sent = jax.lax.all_gather(counts, axis).astype(jnp.int32)  # [source, destination]
    before = jnp.cumsum(sent, axis=0) - sent  # rows that earlier sources put in each destination
    my_starts = jnp.cumsum(sent[me]) - sent[me]  # where each destination's rows start in my sorted rows
    received = sent[:, me]  # from each source
    received_starts = before[:, me]  # where each source's rows start in my receive buffer
    origin_starts = (jnp.cumsum(sent, axis=1) - sent)[:, me]  # where those rows sat in each source's rows

    def there(values, fill):
        out = jnp.full((devices * rows, *values.shape[1:]), fill, values.dtype)
        return jax.lax.ragged_all_to_all(values, out, my_starts, sent[me], before[me], received, axis_name=axis)

    def back(values):
        out = jnp.zeros((rows, *values.shape[1:]), values.dtype)
        return jax.lax.ragged_all_to_all(values, out, received_starts, received, origin_starts, sent[me],
                                         axis_name=axis)

    return _Exchange(there, back)


class MoE(nn.Module):
    cfg: ModelConfig
    gemms: Gemms = Gemms()

    @nn.compact
    def __call__(self, u: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        cfg = self.cfg
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d, e, f, m = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_input_size
        init = normal(cfg.initializer_range)
        batch, length, _ = u.shape
        flat = u.reshape(-1, d)

        router = param(self, "router", init, (d, e), ("embed", "router"), pdt)
        # A buffer, not a trained weight: kept in fp32 and updated from expert loads by the train loop.
        bias = param(self, "e_score_correction_bias", jax.nn.initializers.zeros, (e,), ("router",), jnp.float32)
        logits = jnp.einsum("td,de->te", flat.astype(jnp.float32), router.astype(jnp.float32))
        weights, expert_ids = route(cfg, logits, jax.lax.stop_gradient(bias))
        # For the train loop (read only when "intermediates" is mutable): loads and the balance loss.
        self.sow("intermediates", "expert_counts", jnp.bincount(expert_ids.reshape(-1), length=e))
        self.sow("intermediates", "balance_loss",
                 sequence_balance_loss(logits.reshape(batch, length, e), expert_ids.reshape(batch, length, -1)))

        expert_in = "latent" if cfg.moe_latent_size else "embed"
        x = flat.astype(cdt)
        if cfg.moe_latent_size:
            x = projection(self, "fc1_latent_proj", x, init, (d, m), ("embed", "latent"), 1, cfg.mlp_bias, pdt, cdt,
                           self.gemms.of(self, "fc1_latent_proj"))
        up = param(self, "experts_up", init, (e, m, f), ("experts", expert_in, "moe_mlp"), pdt)
        down = param(self, "experts_down", init, (e, f, m), ("experts", "moe_mlp", expert_in), pdt)
        if expert_axis_size() > 1 or sequence_axis_size() > 1:
            # Each device routes its own tokens: sorting all of them by expert would gather a
            # sequence-sharded batch whole onto every device.
            experts = functools.partial(expert_parallel_experts, batch_axes=(*BATCH_AXES, SEQUENCE_AXIS),
                                        weight_axes=(("experts", expert_in, "moe_mlp"),
                                                     ("experts", "moe_mlp", expert_in)))
        else:
            experts = routed_experts
        expert_gemms = (self.gemms.of(self, "experts.up_proj"), self.gemms.of(self, "experts.down_proj"))
        y = experts(x, weights, expert_ids, up.astype(cdt), down.astype(cdt), expert_gemms).astype(cdt)
        if cfg.moe_latent_size:
            y = projection(self, "fc2_latent_proj", y, init, (m, d), ("latent", "embed"), 1, cfg.mlp_bias, pdt, cdt,
                           self.gemms.of(self, "fc2_latent_proj"))
        y = y.reshape(batch, length, d)
        if cfg.n_shared_experts:
            y = y + MLP(cfg, cfg.moe_shared_expert_intermediate_size, self.gemms.under("shared_experts"),
                        name="shared_experts")(u)
        return y


def _moe_stats(intermediates) -> tuple[dict, dict]:
    """{MoE block: expert token counts} and {MoE block: balance losses} from the sown values. A block is
    named by its parameter path ("layers_2", "mtp/layers_1", or "scan_0/block_5" whose values are
    stacked over the run's repeats: counts [repeats, E]); a block called several times (the MTP module,
    once per depth) adds its counts up."""
    counts, balance = {}, {}
    for path, value in flax.traverse_util.flatten_dict(intermediates).items():
        block = "/".join(path[:-2])
        if path[-1] == "expert_counts":
            counts[block] = sum(value)
        elif path[-1] == "balance_loss":
            balance[block] = jnp.stack(value)
    return counts, balance


def moe_stats(intermediates) -> tuple[dict, Float[Array, ""]]:
    """({MoE block: expert counts}, the balance loss averaged over MoE layers) from the sown values."""
    counts, balance = _moe_stats(intermediates)
    if not balance:
        return counts, jnp.zeros((), jnp.float32)
    return counts, sum(jnp.sum(v) for v in balance.values()) / sum(v.size for v in balance.values())
