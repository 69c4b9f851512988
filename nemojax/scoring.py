"""Log-likelihoods of token sequences: the one scoring path behind eval.py's perplexity and choice tasks
and the lm-eval adapter.

A request is (tokens, n): the summed log-probability of the last n tokens, each given all tokens before
it, and whether each of them was the model's greedy choice. Requests are batched by length, right-padded
to a few bucket lengths (so few shapes compile), and the LM head runs over token chunks, so the
[tokens, vocab] logits of a whole batch never exist at once.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from nemojax.config import ModelConfig
from nemojax.loss import token_logprobs
from nemojax.model import NemotronH
from nemojax.padding import bucket_length

f32 = jnp.float32


class ScoringError(ValueError):
    """A request that cannot be scored (too long, nothing to score)."""


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_scores(cfg: ModelConfig, params: Any, tokens: Int[Array, "b l"]
                 ) -> tuple[Float[Array, "b l-1"], Bool[Array, "b l-1"]]:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) and whether that token was the argmax, for every t."""
    model = NemotronH(cfg)
    hidden = model.apply({"params": params}, tokens, method="hidden")
    return token_logprobs(hidden, model.apply({"params": params}, method="head_weight"), tokens)


class Scorer:
    """Scores requests in batches of `batch_size` sequences of at most `max_length` tokens."""

    def __init__(self, cfg: ModelConfig, params: Any, batch_size: int = 8, max_length: int | None = None):
        if batch_size < 1:
            raise ScoringError(f"batch_size = {batch_size}: must be >= 1")
        if max_length is not None and max_length < 2:
            raise ScoringError(f"max_length = {max_length}: must be >= 2 (a window holds a context token and "
                               "the token it scores)")
        self.cfg, self.params, self.batch_size = cfg, params, batch_size
        self.max_length = max_length or cfg.max_position_embeddings

    def score(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
        """(summed log-probability of the last n tokens, whether all of them were greedy) per request."""
        for i, (tokens, n) in enumerate(requests):
            if not 1 <= n < len(tokens):
                raise ScoringError(f"request {i}: scoring the last {n} of {len(tokens)} tokens needs "
                                   "1 <= n < the number of tokens")
            if len(tokens) > self.max_length:
                raise ScoringError(f"request {i}: {len(tokens)} tokens exceed the limit of {self.max_length}")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))  # similar lengths together
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = min(bucket_length(len(requests[rows[0]][0])), self.max_length)
            ids = np.zeros((self.batch_size, width), np.int32)  # a fixed batch shape: one compile per width
            for r, i in enumerate(rows):
                ids[r, :len(requests[i][0])] = requests[i][0]
            logprobs, greedy = jax.device_get(token_scores(self.cfg, self.params, jnp.asarray(ids)))
            for r, i in enumerate(rows):
                tokens, n = requests[i]
                span = slice(len(tokens) - 1 - n, len(tokens) - 1)  # logits at t score token t + 1
                results[i] = (float(np.sum(logprobs[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])))
        return results

    def continuation_request(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[list[int], int]:
        """The request for log p(continuation | context), the context cut from the left to fit."""
        if len(continuation) >= self.max_length:
            raise ScoringError(f"a continuation of {len(continuation)} tokens leaves no room for context within "
                               f"the limit of {self.max_length} tokens")
        tokens = (list(context) + list(continuation))[-self.max_length:]
        return tokens, len(continuation)

    def rolling_requests(self, tokens: Sequence[int], prefix: int) -> list[tuple[list[int], int]]:
        """Requests that together score every token of a document once (`prefix`, e.g. the eos token,
        conditions its first token): windows of `max_length` tokens, each scoring the tokens after
        the previous window, with as much preceding context as fits."""
        sequence = [prefix, *tokens]
        requests, scored = [], 1
        while scored < len(sequence):
            end = min(len(sequence), scored + self.max_length - 1)
            begin = max(0, end - self.max_length)
            requests.append((sequence[begin:end], end - scored))
            scored = end
        return requests
