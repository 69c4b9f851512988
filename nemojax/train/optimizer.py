"""AdamW with a warmup + cosine or warmup-stable-decay schedule, global-norm clipping, and no weight
decay on norms, biases, A_log, D and dt_bias. MoE correction biases are not trained at all: the train
step moves them from expert loads (`train.step.update_correction_biases`)."""

from __future__ import annotations

import jax
import ml_collections
import optax

from nemojax.config import ConfigError

NO_DECAY = ("scale", "A_log", "D", "dt_bias")  # plus every name ending in "_bias"
NOT_TRAINED = ("e_score_correction_bias",)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    peak, warmup = opt.learning_rate, opt.warmup_steps
    floor = peak * opt.min_lr_ratio
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), floor)
    if opt.schedule == "wsd":
        decay = max(1, int(total_steps * opt.decay_fraction))
        stable = max(0, total_steps - warmup - decay)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
             optax.linear_schedule(peak, floor, decay)], [warmup, warmup + stable])
    raise ConfigError(f"config field `optimizer.schedule` = {opt.schedule!r}: expected 'cosine' or 'wsd'")


def _name(path) -> str:
    """The parameter's name: the last dict key (paths into boxed parameters end in `.value`)."""
    return next(str(p.key) for p in reversed(path) if isinstance(p, jax.tree_util.DictKey))


def param_labels(params) -> dict:
    """"frozen" for correction biases, "no_decay" for norms / biases / SSM scalars, else "decay"."""
    def label(path, _):
        name = _name(path)
        if name in NOT_TRAINED:
            return "frozen"
        if name in NO_DECAY or name.endswith("_bias"):
            return "no_decay"
        return "decay"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt, total_steps)

    def adamw(weight_decay):
        return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=weight_decay)

    transforms = {"decay": adamw(opt.weight_decay), "no_decay": adamw(0.0), "frozen": optax.set_to_zero()}
    clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
    return optax.chain(clip, optax.multi_transform(transforms, param_labels))
