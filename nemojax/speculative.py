"""Speculative decoding with the model's own MTP module: draft k tokens, verify them in one backbone pass.

Each round, for every row (all inside one jitted `lax.while_loop`, rows accepting different lengths):
1. draft: the MTP module chains k tokens from the last accepted position (its first draft reads the
   backbone's hidden state, later ones its own output, as in `nemojax.mtp`);
2. verify: one backbone call over [last token, draft 1..k] (k + 1 positions) against the caches;
3. accept the longest prefix the backbone agrees with, then one more token from the backbone's logits
   at the first disagreement (or after the last draft): greedy, the argmax; sampled, the standard
   rejection rule (accept draft d with probability min(1, p(d) / q(d)), else sample from the normalised
   max(0, p - q)), so the output distribution is exactly the model's;
4. roll back: attention caches need nothing (a row reads only its accepted keys); Mamba layers kept
   their state after each of the k + 1 positions, and the next call resumes from the accepted one
   (`Decoding.resume`): no recomputation. The MTP module then re-reads the accepted positions with the
   backbone's true hidden states, which its next draft starts from.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from nemojax.config import ModelConfig
from nemojax.layers.common import Decoding
from nemojax.model import NemotronH
from nemojax.sampling import Sampling, sample, sampling_logits

PAD = -1  # marks the steps after a row stopped


@dataclasses.dataclass(frozen=True)
class SpeculationStats:
    """What the drafts bought: `accepted[n]` counts the rounds (of live rows) that accepted n of the k
    drafts; each round emits n + 1 tokens."""

    accepted: tuple[int, ...]

    @property
    def rounds(self) -> int:
        return int(sum(self.accepted))

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per backbone call (1 without speculation, at most k + 1)."""
        return sum((n + 1) * c for n, c in enumerate(self.accepted)) / max(self.rounds, 1)


def _distributions(logits: Float[Array, "*b v"], sampling: Sampling) -> Float[Array, "*b v"]:
    return jax.nn.softmax(sampling_logits(logits, sampling), axis=-1)


def _accept(drafts: Int[Array, "b k"], draft_logits: Float[Array, "b k v"], target_logits: Float[Array, "b k1 v"],
            key: jax.Array, sampling: Sampling) -> tuple[Int[Array, " b"], Int[Array, " b"]]:
    """(accepted drafts n, the token after them) per row: greedy, or by rejection sampling."""
    b, k = drafts.shape
    rows = jnp.arange(b)
    if sampling.temperature == 0.0:
        agree = drafts == jnp.argmax(target_logits[:, :k], axis=-1)
        n = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)
        return n, sample(target_logits[rows, n], key, sampling)
    accept_key, bonus_key = jax.random.split(key)
    p, q = _distributions(target_logits, sampling), _distributions(draft_logits, sampling)
    p_draft = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    agree = jax.random.uniform(accept_key, (b, k)) * q_draft < p_draft  # u < p / q
    n = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)
    q_at_n = jnp.where((n < k)[:, None], jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)[rows, n], 0.0)
    residual = jnp.maximum(p[rows, n] - q_at_n, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p[rows, n])
    return n, jax.random.categorical(bonus_key, jnp.log(residual), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "max_new_tokens", "sampling", "stops"))
def speculative_ids(params: Any, ids: Int[Array, "b l"], lengths: Int[Array, " b"], key: jax.Array, *,
                    cfg: ModelConfig, k: int, max_new_tokens: int, sampling: Sampling, stops: tuple[int, ...]
                    ) -> tuple[Int[Array, "b n"], Int[Array, " k1"]]:
    """The new tokens of each row (PAD after a stop token) and the histogram of accepted drafts per round."""
    model = NemotronH(cfg)
    apply = functools.partial(model.apply, mutable=["cache"])
    b = lengths.shape[0]
    rows = jnp.arange(b)
    room = max_new_tokens + 2 * k + 1  # a stopped row's last verification may write past max_new_tokens
    stop_ids = jnp.asarray(stops if stops else (-2,), jnp.int32)

    def decoding(step=0, resume=0, prefill=False):
        return Decoding(lengths, step, resume, prefill=prefill, max_new_tokens=room, slots=k + 1)

    # Prefill: the backbone over the prompts, its first token, then the MTP module over the same positions.
    hidden, cache = apply({"params": params}, ids, decoding(prefill=True), method="hidden")
    key, sub = jax.random.split(key)
    first = sample(model.apply({"params": params}, hidden[rows, lengths - 1], method="logits"), sub, sampling)
    next_ids = jnp.pad(ids[:, 1:], [(0, 0), (0, 1)]).at[rows, lengths - 1].set(first)
    mtp_hidden, mtp_cache = apply({"params": params}, hidden, next_ids, decoding(prefill=True), method="mtp_hidden")

    def draft(params, mtp_cache, start, step, resume, key):
        """k drafts chained by the MTP module from `start` (the hidden state that predicts the first), on a
        copy of its caches that is then dropped."""
        tokens, logits = [], []
        h, scratch = start, mtp_cache
        for j in range(k):
            logits.append(model.apply({"params": params}, h, method="logits"))
            key, sub = jax.random.split(key)
            tokens.append(sample(logits[-1], sub, sampling))
            if j + 1 < k:
                out, state = apply({"params": params, "cache": scratch}, h[:, None], tokens[-1][:, None],
                                   decoding(step + j, resume if j == 0 else 0), method="mtp_hidden")
                h, scratch = out[:, 0], state["cache"]
        return jnp.stack(tokens, axis=1), jnp.stack(logits, axis=1)

    def keep_going(carry):
        count, done = carry[0], carry[1]
        return jnp.any(~done & (count < max_new_tokens))

    def round_(carry):
        count, done, out, token, start, cache, mtp_cache, resume, key, histogram = carry
        step = count - 1  # new tokens the caches hold: every emitted one but the last
        key, draft_key, accept_key = jax.random.split(key, 3)
        drafts, draft_logits = draft(params, mtp_cache, start, step, resume, draft_key)
        block = jnp.concatenate([token[:, None], drafts], axis=1)  # [b, k + 1]
        verified, cache = apply({"params": params, "cache": cache}, block, decoding(step, resume), method="hidden")
        target_logits = model.apply({"params": params}, verified, method="logits")
        n, bonus = _accept(drafts, draft_logits, target_logits, accept_key, sampling)

        j = jnp.arange(k + 1)[None]
        emitted = jnp.where(j < n[:, None], jnp.pad(drafts, [(0, 0), (0, 1)]), bonus[:, None])  # [b, k + 1]
        emitted = jnp.where(j <= n[:, None], emitted, PAD)
        live = ~done & (count < max_new_tokens)
        write = jax.vmap(lambda row, new, at, on: jax.lax.dynamic_update_slice(
            row, jnp.where(on, new, jax.lax.dynamic_slice(row, (at,), (k + 1,))), (at,)))
        out = write(out, emitted, count, live)
        stopped = jnp.any(jnp.isin(emitted, stop_ids) & (j <= n[:, None]), axis=1)
        histogram = histogram + jnp.sum(jax.nn.one_hot(n, k + 1, dtype=jnp.int32) * live[:, None], axis=0)

        # The MTP module re-reads the accepted positions with the backbone's hidden states.
        mtp_out, mtp_state = apply({"params": params, "cache": mtp_cache}, verified, emitted.clip(0),
                                   decoding(step, resume), method="mtp_hidden")
        count = jnp.where(live, count + n + 1, count)
        done = done | (live & stopped)
        return (count, done, out, jnp.where(live, bonus, token), mtp_out[rows, n], cache["cache"],
                mtp_state["cache"], jnp.where(live, n, resume), key, histogram)

    out = jnp.full((b, max_new_tokens + k + 1), PAD, jnp.int32).at[:, 0].set(first)
    carry = (jnp.ones((b,), jnp.int32), jnp.isin(first, stop_ids), out, first, mtp_hidden[rows, lengths - 1],
             cache["cache"], mtp_cache["cache"], jnp.zeros((b,), jnp.int32), key, jnp.zeros((k + 1,), jnp.int32))
    carry = jax.lax.while_loop(keep_going, round_, carry)
    return carry[2][:, :max_new_tokens], carry[9]


def stats_of(histogram: Any) -> SpeculationStats:
    return SpeculationStats(tuple(int(c) for c in np.asarray(histogram)))
