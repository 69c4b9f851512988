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

from nemojax import precision
from nemojax.loss import lm_head_loss
from nemojax.model import NemotronH
from nemojax.mtp import depth_targets
from nemojax.layers.moe import moe_stats
from nemojax.train.dpo import Preference, dpo_objective

f32 = jnp.float32


class TrainState(NamedTuple):
    step: Int[Array, ""]
    params: Any
    opt_state: Any


def mtp_target_counts(model: NemotronH, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"]) -> Float[Array, " depths"]:
    """The valid targets of each MTP depth in a batch (`nemojax.mtp.depth_targets`), at least 1."""
    depths = range(1, model.cfg.num_nextn_predict_layers + 1)
    return jnp.stack([jnp.maximum(jnp.sum(depth_targets(tokens, mask, d)[1][:, 1:].astype(f32)), 1.0)
                      for d in depths]) if depths else jnp.zeros((0,), f32)


def loss_and_stats(model: NemotronH, params, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"],
                   target_count: Float[Array, ""], aux_loss_coef: float, mtp_loss_weight: float = 0.0,
                   mtp_counts: Float[Array, " depths"] | None = None,
                   segment_ids: Int[Array, "b l"] | None = None, rngs: dict | None = None):
    """(objective, (lm loss, balance loss, expert counts, MTP losses per depth)); each loss is this
    microbatch's summed NLL divided by its targets in the whole step's batch (`target_count`, and
    `mtp_counts` per MTP depth).

    objective = lm loss + aux_loss_coef x balance loss + mtp_loss_weight / depths x sum of the depths'
    losses (docs/models.md). With weight 0 the MTP module is not run (its gradients are zero).
    `segment_ids` keeps packed documents apart (`data.isolate_documents`); `rngs`: `precision.rngs`.
    """
    hidden, state = model.apply({"params": params}, tokens, segment_ids=segment_ids, method="hidden",
                                mutable=["intermediates"], rngs=rngs)
    head = model.apply({"params": params}, method="head_weight").astype(hidden.dtype)
    micro_targets = jnp.sum(mask[:, 1:].astype(f32))
    lm_loss = lm_head_loss(hidden, head, tokens, mask) * micro_targets / target_count
    mtp_losses = jnp.zeros((0,), f32)
    if mtp_loss_weight and model.cfg.num_nextn_predict_layers:
        outputs, mtp_state = model.apply({"params": params}, hidden, tokens, segment_ids, method="mtp_depths",
                                         mutable=["intermediates"], rngs=rngs)
        state = {"intermediates": {**state.get("intermediates", {}), **mtp_state.get("intermediates", {})}}
        losses = []
        for depth, (out, count) in enumerate(zip(outputs, mtp_counts), start=1):
            shifted, valid = depth_targets(tokens, mask, depth)
            micro = jnp.sum(valid[:, 1:].astype(f32))
            losses.append(lm_head_loss(out[:, :shifted.shape[1]], head, shifted, valid) * micro / count)
        mtp_losses = jnp.stack(losses)
    counts, balance_loss = moe_stats(state.get("intermediates", {}))
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


def lm_objective(model: NemotronH, batch: dict, aux_loss_coef: float, mtp_loss_weight: float,
                 grad_accum_steps: int):
    """The microbatch objective of pretraining and SFT (the same loss; SFT's mask keeps the assistant's
    tokens): (objective, (metric sums, expert counts)), normalised by the whole batch's target counts."""
    target_count = jnp.maximum(jnp.sum(batch["mask"][:, 1:].astype(f32)), 1.0)
    mtp_counts = mtp_target_counts(model, batch["tokens"], batch["mask"])

    def objective(params, micro):
        value, (lm, balance, counts, mtp) = loss_and_stats(
            model, params, micro["tokens"], micro["mask"], target_count, aux_loss_coef, mtp_loss_weight,
            mtp_counts, micro.get("segment_ids"), precision.rngs(micro))
        sums = {"loss": lm}
        if counts:
            sums["balance_loss"] = balance / grad_accum_steps
        if mtp.size:
            sums["mtp_loss"] = mtp  # [depths]
        return value, (sums, counts)

    return objective


def train_step(model: NemotronH, optimizer: optax.GradientTransformation, state: TrainState, batch: dict,
               grad_accum_steps: int, aux_loss_coef: float, bias_update_rate: float,
               schedule: optax.Schedule, mtp_loss_weight: float = 0.0, preference: Preference | None = None,
               reference: Any = None, seed: int = 0) -> tuple[TrainState, dict]:
    """`preference` makes it a DPO step (`nemojax.train.dpo`) against `reference` (frozen parameters, or
    None when the batch carries precomputed "reference_logps"); else the next-token loss. `seed`: the
    low-precision recipe's random numbers, drawn from it and the step so a resumed run repeats them."""
    if preference is None:
        objective = lm_objective(model, batch, aux_loss_coef, mtp_loss_weight, grad_accum_steps)
    else:
        objective = dpo_objective(model, preference, batch, aux_loss_coef, grad_accum_steps, reference)
    micro = batch["tokens"].shape[0] // grad_accum_steps
    microbatches = {k: v.reshape(grad_accum_steps, micro, *v.shape[1:]) for k, v in batch.items()}
    if model.cfg.precision != "bf16":
        microbatches[precision.BATCH_KEY] = jax.random.split(jax.random.fold_in(jax.random.key(seed), state.step),
                                                     grad_accum_steps)
    grad_fn = jax.grad(objective, has_aux=True)

    def accumulate(carry, microbatch):
        grads, sums, counts = carry
        g, (s, c) = grad_fn(state.params, microbatch)
        return jax.tree.map(jnp.add, (grads, sums, counts), (g, s, c)), None

    _, aux_shapes = jax.eval_shape(objective, state.params, jax.tree.map(lambda t: t[0], microbatches))
    init = (jax.tree.map(lambda p: jnp.zeros(p.shape, f32), state.params),
            *jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))
    (grads, sums, counts), _ = jax.lax.scan(accumulate, init, microbatches)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = update_correction_biases(params, counts, bias_update_rate)
    metrics = {**sums, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step)}
    if counts:
        metrics["expert_counts"] = counts
    return TrainState(state.step + 1, params, opt_state), metrics
