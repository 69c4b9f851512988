"""One optimizer step: microbatched loss and gradients, AdamW update, MoE correction-bias update.

The step is a pure function of (state, batch), jitted by the trainer with shardings from the mesh.
Gradient accumulation runs inside it (`lax.scan` over microbatches), so a checkpoint always falls on a
whole step and the accumulated loss equals the full batch's loss.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from nemojax.loss import lm_head_loss
from nemojax.model import NemotronH
from nemojax.mtp import depth_targets

f32 = jnp.float32


class TrainState(NamedTuple):
    step: Int[Array, ""]
    params: Any
    opt_state: Any


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


def _mean_over_layers(balance: dict) -> Float[Array, ""]:
    if not balance:
        return jnp.zeros((), f32)
    return sum(jnp.sum(v) for v in balance.values()) / sum(v.size for v in balance.values())


def mtp_target_counts(model: NemotronH, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"]) -> Float[Array, " depths"]:
    """The valid targets of each MTP depth in a batch (`nemojax.mtp.depth_targets`), at least 1."""
    depths = range(1, model.cfg.num_nextn_predict_layers + 1)
    return jnp.stack([jnp.maximum(jnp.sum(depth_targets(tokens, mask, d)[1][:, 1:].astype(f32)), 1.0)
                      for d in depths]) if depths else jnp.zeros((0,), f32)


def loss_and_stats(model: NemotronH, params, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"],
                   target_count: Float[Array, ""], aux_loss_coef: float, mtp_loss_weight: float = 0.0,
                   mtp_counts: Float[Array, " depths"] | None = None,
                   segment_ids: Int[Array, "b l"] | None = None):
    """(objective, (lm loss, balance loss, expert counts, MTP losses per depth)); each loss is this
    microbatch's summed NLL divided by its targets in the whole step's batch (`target_count`, and
    `mtp_counts` per MTP depth).

    objective = lm loss + aux_loss_coef x balance loss + mtp_loss_weight / depths x sum of the depths'
    losses (docs/models.md). With weight 0 the MTP module is not run (its gradients are zero).
    `segment_ids` keeps packed documents apart (`data.isolate_documents`).
    """
    hidden, state = model.apply({"params": params}, tokens, segment_ids=segment_ids, method="hidden",
                                mutable=["intermediates"])
    head = model.apply({"params": params}, method="head_weight").astype(hidden.dtype)
    micro_targets = jnp.sum(mask[:, 1:].astype(f32))
    lm_loss = lm_head_loss(hidden, head, tokens, mask) * micro_targets / target_count
    mtp_losses = jnp.zeros((0,), f32)
    if mtp_loss_weight and model.cfg.num_nextn_predict_layers:
        outputs, mtp_state = model.apply({"params": params}, hidden, tokens, segment_ids, method="mtp_depths",
                                         mutable=["intermediates"])
        state = {"intermediates": {**state.get("intermediates", {}), **mtp_state.get("intermediates", {})}}
        losses = []
        for depth, (out, count) in enumerate(zip(outputs, mtp_counts), start=1):
            shifted, valid = depth_targets(tokens, mask, depth)
            micro = jnp.sum(valid[:, 1:].astype(f32))
            losses.append(lm_head_loss(out[:, :shifted.shape[1]], head, shifted, valid) * micro / count)
        mtp_losses = jnp.stack(losses)
    counts, balance = _moe_stats(state.get("intermediates", {}))
    balance_loss = _mean_over_layers(balance)
    objective = lm_loss + aux_loss_coef * balance_loss
    if mtp_losses.size:
        objective = objective + mtp_loss_weight / mtp_losses.size * jnp.sum(mtp_losses)
    return objective, (lm_loss, balance_loss, counts, mtp_losses)


def update_correction_biases(params, counts: dict, rate: float):
    """bias += rate * sign(mean load - load) for every MoE layer: under-used experts get picked more."""
    if not counts:
        return params

    def update(tree: dict, path: list[str], count: jax.Array) -> dict:
        if not path:
            mixer = dict(tree["mixer"])
            load = count.astype(f32)
            mixer["e_score_correction_bias"] = mixer["e_score_correction_bias"] + rate * jnp.sign(
                jnp.mean(load, axis=-1, keepdims=True) - load)
            return {**tree, "mixer": mixer}
        return {**tree, path[0]: update(tree[path[0]], path[1:], count)}

    params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else dict(params)
    for block, count in counts.items():
        params = update(params, block.split("/"), count)
    return params


def train_step(model: NemotronH, optimizer: optax.GradientTransformation, state: TrainState, batch: dict,
               grad_accum_steps: int, aux_loss_coef: float, bias_update_rate: float,
               schedule: optax.Schedule, mtp_loss_weight: float = 0.0) -> tuple[TrainState, dict]:
    tokens, mask = batch["tokens"], batch["mask"]
    segment_ids = batch.get("segment_ids")
    target_count = jnp.maximum(jnp.sum(mask[:, 1:].astype(f32)), 1.0)
    mtp_counts = mtp_target_counts(model, tokens, mask)
    micro = tokens.shape[0] // grad_accum_steps
    split = lambda t: None if t is None else t.reshape(grad_accum_steps, micro, *t.shape[1:])  # noqa: E731
    objective = lambda p, t, m, s: loss_and_stats(model, p, t, m, target_count, aux_loss_coef,  # noqa: E731
                                                  mtp_loss_weight, mtp_counts, s)
    grad_fn = jax.grad(objective, has_aux=True)

    def accumulate(carry, microbatch):
        grads, lm_loss, balance_loss, counts, mtp_losses = carry
        g, (lm, balance, c, mtp) = grad_fn(state.params, *microbatch)
        return (jax.tree.map(jnp.add, grads, g), lm_loss + lm, balance_loss + balance / grad_accum_steps,
                jax.tree.map(jnp.add, counts, c), mtp_losses + mtp), None

    first = lambda t: None if t is None else t[0]  # noqa: E731
    _, (_, _, count_shapes, mtp_shape) = jax.eval_shape(objective, state.params, split(tokens)[0], split(mask)[0],
                                                        first(split(segment_ids)))
    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, f32), state.params), jnp.zeros((), f32),
            jnp.zeros((), f32), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), count_shapes),
            jnp.zeros(mtp_shape.shape, f32))
    (grads, lm_loss, balance_loss, counts, mtp_losses), _ = jax.lax.scan(
        accumulate, init, (split(tokens), split(mask), split(segment_ids)))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = update_correction_biases(params, counts, bias_update_rate)
    metrics = {"loss": lm_loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}
    if counts:
        metrics["balance_loss"] = balance_loss
        metrics["expert_counts"] = counts
    if mtp_losses.size:
        metrics["mtp_loss"] = mtp_losses  # [depths]
    return TrainState(state.step + 1, params, opt_state), metrics
