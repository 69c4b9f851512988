"""Direct preference optimisation (Rafailov et al. 2023) on packed pair windows.

A window holds whole pairs: pair k's chosen reply is segment 2k, its rejected reply segment 2k + 1
(`nemojax.data.packing`), each masked to the reply's tokens. A reply's log-probability is the sum of its
target tokens' log-probabilities; its reward is beta x (log pi - log pi_ref). The loss per pair is
-(1 - eps) log sigmoid(margin) - eps log sigmoid(-margin), margin = chosen reward - rejected reward;
optionally plus a weighted NLL of the chosen replies, which keeps their likelihood from sinking.

The gradient goes through the one fused LM-head loss (`nemojax.loss.weighted_nll`): d loss / d theta =
sum over replies of (d loss / d log-prob of the reply) x d log-prob / d theta, so each token's NLL is
weighed by minus its reply's derivative, and the [tokens, vocab] logits are never kept for a backward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from nemojax import precision
from nemojax.layers.moe import moe_stats
from nemojax.loss import token_logprobs, weighted_nll
from nemojax.model import NemotronH

f32 = jnp.float32
METRICS = ("reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin")


class Preference(NamedTuple):
    beta: float
    label_smoothing: float = 0.0
    sft_loss_weight: float = 0.0  # + weight x the chosen replies' mean token NLL (NeMo's sft_loss_weight, RPO)


def segment_sums(values: Float[Array, "b l-1"], segment_ids: Int[Array, "b l"]) -> Float[Array, "b l"]:
    """sum of values[:, t] over the targets t + 1 of each segment id (a window has at most l segments)."""
    length = segment_ids.shape[1]
    return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=length))(values, segment_ids[:, 1:])


def pair_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, preference: Preference):
    """(loss, chosen reward, rejected reward) per pair from the four summed log-probabilities."""
    chosen = preference.beta * (policy_chosen - reference_chosen)
    rejected = preference.beta * (policy_rejected - reference_rejected)
    margin = chosen - rejected
    eps = preference.label_smoothing
    loss = -(1 - eps) * jax.nn.log_sigmoid(margin) - eps * jax.nn.log_sigmoid(-margin)
    return loss, chosen, rejected


def _pairs(sums: Float[Array, "b l"]) -> tuple[Float[Array, "b p"], Float[Array, "b p"]]:
    pairs = sums.shape[1] // 2
    return sums[:, 0:2 * pairs:2], sums[:, 1:2 * pairs:2]


def valid_pairs(mask: Bool[Array, "b l"], segment_ids: Int[Array, "b l"]) -> Bool[Array, "b p"]:
    """The window slots that hold a pair: both replies have targets (padding and empty slots do not)."""
    chosen, rejected = _pairs(segment_sums(mask[:, 1:].astype(f32), segment_ids))
    return (chosen > 0) & (rejected > 0)


def reply_logprobs(model: NemotronH, params: Any, tokens: Int[Array, "b l"], mask: Bool[Array, "b l"],
                   segment_ids: Int[Array, "b l"]) -> Float[Array, "b l"]:
    """Each segment's summed target log-probability (the reference's, in the step or a first pass)."""
    hidden = model.apply({"params": params}, tokens, segment_ids=segment_ids, method="hidden")
    logprobs, _ = token_logprobs(hidden, model.apply({"params": params}, method="head_weight"), tokens)
    return segment_sums(logprobs * mask[:, 1:], segment_ids)


def _reference(model: NemotronH, batch: dict, reference: Any) -> Float[Array, "b l"]:
    if reference is None:
        return batch["reference_logps"]
    return jax.lax.stop_gradient(reply_logprobs(model, reference, batch["tokens"], batch["mask"],
                                                batch["segment_ids"]))


def dpo_objective(model: NemotronH, preference: Preference, batch: dict, aux_loss_coef: float,
                  grad_accum_steps: int, reference: Any = None):
    """The microbatch objective for `train_step`: (objective, (metric sums, expert counts)); the losses
    and metrics are divided by the whole `batch`'s pair (and chosen-token) counts, so microbatches add up
    to the batch's. `reference`: the frozen reference parameters, or None when batches carry
    "reference_logps"."""
    pair_count = jnp.maximum(jnp.sum(valid_pairs(batch["mask"], batch["segment_ids"]).astype(f32)), 1.0)
    chosen_token_count = jnp.maximum(jnp.sum(batch["mask"][:, 1:] & (batch["segment_ids"][:, 1:] % 2 == 0)), 1)

    def objective(params, batch):
        tokens, mask, segment_ids = batch["tokens"], batch["mask"], batch["segment_ids"]
        hidden, state = model.apply({"params": params}, tokens, segment_ids=segment_ids, method="hidden",
                                    mutable=["intermediates"], rngs=precision.rngs(batch))
        head = model.apply({"params": params}, method="head_weight").astype(hidden.dtype)
        logprobs, _ = token_logprobs(jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(head), tokens)
        policy = segment_sums(logprobs * mask[:, 1:], segment_ids)
        ref = _reference(model, batch, reference)
        valid = valid_pairs(mask, segment_ids).astype(f32)

        def mean_loss(policy_sums):
            loss, _, _ = pair_losses(*_pairs(policy_sums), *_pairs(ref), preference)
            return jnp.sum(loss * valid) / pair_count

        loss, per_reply = jax.value_and_grad(mean_loss)(policy)  # d loss / d each reply's log-prob
        token_weights = -jnp.take_along_axis(per_reply, segment_ids[:, 1:], axis=1) * mask[:, 1:]
        chosen_nll = 0.0
        if preference.sft_loss_weight:
            chosen_tokens = mask[:, 1:] & (segment_ids[:, 1:] % 2 == 0)
            sft = preference.sft_loss_weight * chosen_tokens / chosen_token_count
            chosen_nll = -jnp.sum(logprobs * sft)
            token_weights = token_weights + sft
        surrogate = weighted_nll(hidden, head, tokens, token_weights)  # its gradient is the objective's
        counts, balance = moe_stats(state.get("intermediates", {}))
        objective = (loss + chosen_nll + surrogate - jax.lax.stop_gradient(surrogate)
                     + aux_loss_coef * balance)
        sums = {k: v / pair_count for k, v in _pair_sums(policy, ref, valid, preference).items() if k != "pairs"}
        if counts:
            sums["balance_loss"] = balance / grad_accum_steps
        return objective, (sums, counts)

    return objective


def _pair_sums(policy, ref, valid, preference: Preference) -> dict[str, Float[Array, ""]]:
    loss, chosen, rejected = pair_losses(*_pairs(policy), *_pairs(ref), preference)
    return {"loss": jnp.sum(loss * valid), "reward_accuracy": jnp.sum((chosen > rejected) * valid),
            "chosen_reward": jnp.sum(chosen * valid), "rejected_reward": jnp.sum(rejected * valid),
            "reward_margin": jnp.sum((chosen - rejected) * valid), "pairs": jnp.sum(valid)}


def dpo_eval_sums(model: NemotronH, preference: Preference, params: Any, batch: dict, reference: Any = None
                  ) -> dict[str, Float[Array, ""]]:
    """Held-out pairs: the summed loss, right orderings, rewards and margins, and the pair count."""
    policy = reply_logprobs(model, params, batch["tokens"], batch["mask"], batch["segment_ids"])
    valid = valid_pairs(batch["mask"], batch["segment_ids"]).astype(f32)
    return _pair_sums(policy, _reference(model, batch, reference), valid, preference)


def dpo_eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    """`eval_loss` and `eval_<metric>` per held-out pair, from the added-up `dpo_eval_sums`."""
    pairs = max(totals["pairs"], 1.0)
    return {"eval_loss": totals["loss"] / pairs, **{f"eval_{k}": totals[k] / pairs for k in METRICS}}
