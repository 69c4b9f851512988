"""Mixture of experts (the `E` block): sigmoid router, dropless routed experts, shared expert, LatentMoE.

Routing (Nemotron 3): fp32 sigmoid scores; a correction bias (aux-loss-free balancing, updated outside
the optimizer) changes only *which* experts are chosen; group-limited top-k; the combine weights are
the unbiased scores of the chosen experts, optionally normalised, times `routed_scaling_factor`.
Experts run dropless: assignments are sorted by expert and multiplied with `jax.lax.ragged_dot`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.config import ModelConfig
from nemojax.layers.common import dense, normal, param
from nemojax.layers.mlp import MLP, relu2


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
                   up: Float[Array, "e d f"], down: Float[Array, "e f d"]) -> Float[Array, "t d"]:
    """Dropless expert MLPs: sort the (token, slot) assignments by expert, grouped matmuls, scatter back."""
    tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token_of = order // top_k
    group_sizes = jnp.bincount(flat_ids, length=up.shape[0]).astype(jnp.int32)
    hidden = relu2(jax.lax.ragged_dot(x[token_of], up, group_sizes))
    out = jax.lax.ragged_dot(hidden, down, group_sizes)
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((tokens, x.shape[-1]), jnp.float32).at[token_of].add(out)


def expert_parallel_experts(x: Float[Array, "t d"], weights: Float[Array, "t k"], expert_ids: Int[Array, "t k"],
                            up: Float[Array, "e d f"], down: Float[Array, "e f d"], axis: str = "expert",
                            batch_axes: tuple[str, ...] = ("data", "fsdp", "expert")) -> Float[Array, "t d"]:
    """`routed_experts` with the experts split over mesh axis `axis` (inside a mesh context): each
    device sends every (token, slot) assignment to the device holding its expert with one all-to-all,
    runs only its own experts on what it receives, and a second all-to-all brings the results back.

    Dropless without a ragged exchange (XLA:CPU has no `ragged_all_to_all`): every send buffer has room
    for all of a device's assignments, so no expert can overflow; this costs memory, not exactness.
    """
    def local(x, weights, expert_ids, up, down):
        devices, experts_here = jax.lax.axis_size(axis), up.shape[0]
        assignments = expert_ids.size
        flat_ids = expert_ids.reshape(-1)
        destination = flat_ids // experts_here
        order = jnp.argsort(destination, stable=True)
        sorted_dest = destination[order]
        counts = jnp.bincount(destination, length=devices)
        slot = jnp.arange(assignments) - (jnp.cumsum(counts) - counts)[sorted_dest]
        token_of = order // expert_ids.shape[1]
        send_x = jnp.zeros((devices, assignments, x.shape[1]), x.dtype).at[sorted_dest, slot].set(x[token_of])
        send_e = jnp.full((devices, assignments), experts_here, jnp.int32).at[sorted_dest, slot].set(
            flat_ids[order] - sorted_dest * experts_here)  # the expert's index on its device; empty slots: none
        recv_x = jax.lax.all_to_all(send_x, axis, 0, 0).reshape(-1, x.shape[1])
        recv_e = jax.lax.all_to_all(send_e, axis, 0, 0).reshape(-1)
        by_expert = jnp.argsort(recv_e, stable=True)
        group_sizes = jnp.bincount(recv_e, length=experts_here + 1)[:experts_here].astype(jnp.int32)
        hidden = relu2(jax.lax.ragged_dot(recv_x[by_expert], up, group_sizes))
        out = jax.lax.ragged_dot(hidden, down, group_sizes)
        out = jnp.where((recv_e[by_expert] < experts_here)[:, None], out, 0)  # rows past the groups
        results = jnp.zeros_like(out).at[by_expert].set(out).reshape(devices, assignments, -1)
        back = jax.lax.all_to_all(results, axis, 0, 0)[sorted_dest, slot]
        combined = back.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
        return jnp.zeros((x.shape[0], x.shape[1]), jnp.float32).at[token_of].add(combined)

    # Tokens stay where the batch sharding put them (split over every data-parallel axis); each device
    # gathers its experts' weights whole (FSDP / tensor shards) at the boundary.
    P = jax.sharding.PartitionSpec
    tokens, experts = P(batch_axes), P(axis)
    return jax.shard_map(local, in_specs=(tokens, tokens, tokens, experts, experts), out_specs=tokens)(
        x, weights, expert_ids, up, down)


def _expert_axis_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get("expert", 1)


class MoE(nn.Module):
    cfg: ModelConfig

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
            x = dense(x, param(self, "fc1_latent_proj", init, (d, m), ("embed", "latent"), pdt), 1, cdt)
        up = param(self, "experts_up", init, (e, m, f), ("experts", expert_in, "moe_mlp"), pdt)
        down = param(self, "experts_down", init, (e, f, m), ("experts", "moe_mlp", expert_in), pdt)
        experts = expert_parallel_experts if _expert_axis_size() > 1 else routed_experts
        y = experts(x, weights, expert_ids, up.astype(cdt), down.astype(cdt)).astype(cdt)
        if cfg.moe_latent_size:
            y = dense(y, param(self, "fc2_latent_proj", init, (m, d), ("latent", "embed"), pdt), 1, cdt)
        y = y.reshape(batch, length, d)
        if cfg.n_shared_experts:
            y = y + MLP(cfg, cfg.moe_shared_expert_intermediate_size, name="shared_experts")(u)
        return y
