"""Sampling from a model with caches: one prefill, then one jitted `lax.while_loop` of decoding steps.

Prompts of different lengths are right-padded into one batch. Prefill keeps padding out of every cache
(`Decoding`), and each row then decodes at its own position, so a row's tokens do not depend on the
other prompts. Mamba layers advance by the recurrent update (constant cost per token); attention
layers read their key/value cache up to the row's position. With `speculative_tokens`, models with MTP
layers decode several tokens per backbone call instead (`nemojax.speculative`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.padding import bucket_length
from nemojax.sampling import Sampling, sample
from nemojax.speculative import PAD, SpeculationStats, speculative_ids, stats_of
from nemojax.tokenizer import ThinkingTokens

class GenerationError(ValueError):
    """Prompts or options that cannot be generated from."""


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, max_thinking_tokens: int | None = None,
             thinking: ThinkingTokens | None = None, thinking_grace: int = 256, speculative_tokens: int = 0,
             prefill_chunk: int = 0, return_stats: bool = False
             ) -> list[list[int]] | tuple[list[list[int]], SpeculationStats]:
    """The new tokens for each prompt, up to `max_new_tokens`, ending before the first stop token
    (default: the config's eos tokens). Greedy when `temperature` is 0.

    `speculative_tokens=k` drafts k tokens per step with the model's MTP module and verifies them in one
    backbone pass (`nemojax.speculative`): the same tokens greedily, the same distribution when sampling,
    fewer backbone calls. `return_stats=True` also returns its `SpeculationStats`.

    `max_thinking_tokens` bounds the reasoning of models that think between `thinking.start` and
    `thinking.end`: after that many thinking tokens an unfinished thought is closed by inserting
    `thinking.end` after the next newline, or after `thinking_grace` more tokens if no newline comes.
    A prompt that ends inside an open thought (the chat template's `<think>`) counts as thinking.

    `prefill_chunk=n` reads prompts n tokens at a time (`chunked_prefill`): the same tokens, with the
    prefill's activations bounded by n tokens instead of the prompt's length (long contexts).
    """
    prompts = [list(map(int, p)) for p in prompts]
    _check(cfg, prompts, max_new_tokens)
    check_sampling(cfg, temperature, top_k, top_p)
    stops = tuple(int(t) for t in (_eos_tokens(cfg) if stop_tokens is None else stop_tokens))
    if max_thinking_tokens is None:
        thinking = None
    elif thinking is None:
        raise GenerationError("max_thinking_tokens needs `thinking=ThinkingTokens(start, end, newlines)`; "
                              "`nemojax.tokenizer.from_file(path).thinking_tokens()` reads them from a tokenizer")
    limits = np.array([max_thinking_tokens or 0, thinking_grace], np.int32)
    _check_speculation(cfg, speculative_tokens, thinking)
    _check_prefill_chunk(prefill_chunk, speculative_tokens)

    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = bucket_length(int(lengths.max()))
    if prefill_chunk and padded > prefill_chunk:
        padded = -(-int(lengths.max()) // prefill_chunk) * prefill_chunk  # whole chunks
    ids = np.zeros((len(prompts), padded), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    thinking_now = np.array([thinking is not None and _open_thought(p, thinking) for p in prompts], bool)
    cfg = dataclasses.replace(cfg, remat="none")
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    if speculative_tokens:
        out, histogram = speculative_ids(params, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(seed),
                                         cfg=cfg, k=int(speculative_tokens), max_new_tokens=int(max_new_tokens),
                                         sampling=sampling, stops=stops)
        results = _until_stop(out, stops)
        return (results, stats_of(histogram)) if return_stats else results
    out = _generate_ids(params, jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(thinking_now),
                        jnp.asarray(limits), jax.random.key(seed), cfg=cfg, max_new_tokens=int(max_new_tokens),
                        sampling=sampling, stops=stops, thinking=thinking, prefill_chunk=int(prefill_chunk))
    results = _until_stop(out, stops)
    # Without speculation every token costs one backbone call: no drafts accepted.
    return (results, SpeculationStats((sum(len(r) for r in results),))) if return_stats else results


def _until_stop(out: Any, stops: tuple[int, ...]) -> list[list[int]]:
    results = []
    for row in np.asarray(out):
        tokens = []
        for t in row.tolist():
            if t == PAD or t in stops:
                break
            tokens.append(t)
        results.append(tokens)
    return results


def _check_speculation(cfg: ModelConfig, k: int, thinking: ThinkingTokens | None) -> None:
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise GenerationError(f"speculative_tokens = {k!r}: must be an integer >= 0 (0: no speculation)")
    if k and not cfg.num_nextn_predict_layers:
        raise GenerationError(f"speculative_tokens = {k} drafts with the model's MTP layers, and this model has "
                              "none (num_nextn_predict_layers = 0)")
    if k and thinking is not None:
        raise GenerationError("speculative_tokens cannot be combined with max_thinking_tokens yet: the budget "
                              "forces tokens one step at a time")


def _check_prefill_chunk(chunk: int, speculative_tokens: int) -> None:
    if not isinstance(chunk, (int, np.integer)) or chunk < 0:
        raise GenerationError(f"prefill_chunk = {chunk!r}: must be an integer >= 0 (0: the whole prompt at once)")
    if chunk and speculative_tokens:
        raise GenerationError("prefill_chunk cannot be combined with speculative_tokens yet: speculative "
                              "decoding prefills its MTP caches in one call")


def _eos_tokens(cfg: ModelConfig) -> tuple[int, ...]:
    eos = cfg.eos_token_id
    return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


def check_sampling(cfg: ModelConfig, temperature: float, top_k: int, top_p: float) -> None:
    """The sampling options' ranges: a bad one would emit token 0 forever, sample the least likely tokens
    or fail inside JAX."""
    if not temperature >= 0:  # also NaN
        raise GenerationError(f"temperature = {temperature}: must be >= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p = {top_p}: must be in (0, 1] (1 keeps every token)")
    if not 0 <= top_k <= cfg.vocab_size:
        raise GenerationError(f"top_k = {top_k}: must be in [0, vocab_size = {cfg.vocab_size}] (0 keeps every token)")


def _check(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise GenerationError("no prompts to generate from")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    limit = cfg.max_position_embeddings
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise GenerationError(f"prompt {i} is empty (generation needs at least one token)")
        if len(prompt) + max_new_tokens > limit:
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                                  f"that exceeds the model's limit of {limit} tokens (max_position_embeddings)")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")


def _open_thought(prompt: list[int], thinking: ThinkingTokens) -> bool:
    start, end = thinking.start, thinking.end
    last_start = max((i for i, t in enumerate(prompt) if t == start), default=-1)
    last_end = max((i for i, t in enumerate(prompt) if t == end), default=-1)
    return last_start > last_end


def apply_budget(token: Int[Array, " b"], state: tuple, ids: ThinkingTokens, limits: Int[Array, "2"]
                 ) -> tuple[Int[Array, " b"], tuple]:
    """Force `</think>` where the budget says so, then update (in thought, thought length, force next).
    limits: (max thinking tokens, grace)."""
    in_thought, length, force = state
    token = jnp.where(force, ids.end, token)
    opened, closed = token == ids.start, token == ids.end
    length = jnp.where(opened, 0, length + in_thought.astype(jnp.int32))
    in_thought = (in_thought | opened) & ~closed
    newline = jnp.isin(token, jnp.asarray(ids.newlines, jnp.int32))
    over = length >= limits[0]
    force = in_thought & over & (newline | (length >= limits[0] + limits[1]))
    return token, (in_thought, length, force)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "stops", "thinking",
                                             "prefill_chunk"))
def _generate_ids(params: Any, ids: Int[Array, "b l"], lengths: Int[Array, " b"],
                  thinking_now: Bool[Array, " b"], limits: Int[Array, "2"], key: jax.Array, *, cfg: ModelConfig,
                  max_new_tokens: int, sampling: Sampling, stops: tuple[int, ...], thinking: ThinkingTokens | None,
                  prefill_chunk: int = 0) -> Int[Array, "b n"]:
    chunk = prefill_chunk if 0 < prefill_chunk < ids.shape[1] else ids.shape[1]
    logits, cache = chunked_prefill(cfg, params, ids, lengths, max_new_tokens, chunk)
    return decode_tokens(cfg, params, cache, logits, lengths, thinking_now, limits, key,
                         max_new_tokens=max_new_tokens, sampling=sampling, stops=stops, thinking=thinking)


def chunked_prefill(cfg: ModelConfig, params: Any, ids: Int[Array, "b l"], lengths: Int[Array, " b"],
                    max_new_tokens: int, chunk: int) -> tuple[Float[Array, "b v"], Any]:
    """The prefill (next-token logits and caches) of right-padded prompts read `chunk` tokens at a time,
    each chunk continuing the caches the previous one left: what the one-shot prefill gives, with one
    chunk's activations (Mamba states are constant in size; the attention caches hold the prompt). The
    padded length must be whole chunks; one chunk is the one-shot prefill."""
    total = ids.shape[1]
    if total % chunk:
        raise GenerationError(f"a prefill of {total} tokens in chunks of {chunk}: the padded prompt must be "
                              "whole chunks")
    model = NemotronH(cfg)

    def prefill(variables, offset):
        piece = jax.lax.dynamic_slice_in_dim(ids, offset, chunk, axis=1)
        logits, cache = model.apply(variables, piece, lengths, max_new_tokens, offset, total, method="prefill",
                                    mutable=["cache"])
        return logits, cache["cache"]

    def next_chunk(carry, offset):
        logits, cache = carry
        chunk_logits, cache = prefill({"params": params, "cache": cache}, offset)
        reached = lengths - 1 >= offset  # the row's last token is in this chunk or a later one
        return (jnp.where(reached[:, None], chunk_logits, logits), cache), None

    first = prefill({"params": params}, 0)  # creates the caches
    return jax.lax.scan(next_chunk, first, jnp.arange(chunk, total, chunk))[0]


def decode_tokens(cfg: ModelConfig, params: Any, cache: Any, logits: Float[Array, "b v"], lengths: Int[Array, " b"],
                  thinking_now: Bool[Array, " b"], limits: Int[Array, "2"], key: jax.Array, *, max_new_tokens: int,
                  sampling: Sampling, stops: tuple[int, ...], thinking: ThinkingTokens | None) -> Int[Array, "b n"]:
    """The decode loop after a prefill (its caches and last logits): up to `max_new_tokens` per row, PAD
    after a row's stop token; ends early when every row has stopped."""
    model = NemotronH(cfg)
    batch = lengths.shape[0]
    stop_ids = jnp.asarray(stops if stops else (-2,), jnp.int32)
    thought = (thinking_now, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))

    def keep_going(carry):
        step, done = carry[0], carry[3]
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(carry):
        step, logits, cache, done, out, key, thought = carry
        key, sub = jax.random.split(key)
        token = sample(logits, sub, sampling)
        if thinking is not None:
            token, thought = apply_budget(token, thought, thinking, limits)
        out = out.at[:, step].set(jnp.where(done, PAD, token))
        done = done | jnp.isin(token, stop_ids)
        logits, cache = model.apply({"params": params, "cache": cache}, token, lengths, step, method="decode",
                                    mutable=["cache"])
        return step + 1, logits, cache["cache"], done, out, key, thought

    out = jnp.full((batch, max_new_tokens), PAD, jnp.int32)
    carry = (jnp.int32(0), logits, cache, jnp.zeros((batch,), bool), out, key, thought)
    return jax.lax.while_loop(keep_going, advance, carry)[4]
