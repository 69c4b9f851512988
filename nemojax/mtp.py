"""Multi-token prediction (Nemotron 3 Super / Ultra): one extra block stack that predicts one token further.

One depth (docs/models.md): from h[t], a hidden state that has seen the tokens up to t + d - 1 (the
backbone's output after norm_f for the first depth), and the embedding of the token after them,
tokens[t + d], it computes

    x = eh_proj(concat[enorm(embed(tokens[t + d])), hnorm(h[t])])    (embedding half first)
    x = the inner blocks (`mtp_hybrid_override_pattern`, pre-norm residual), then final_layernorm

and the shared LM head reads x as a prediction of tokens[t + d + 1]. Depth d + 1 takes depth d's output
as its h. The `num_nextn_predict_layers` depths all reuse this one module (the Hub checkpoint has one),
and speculative decoding (`nemojax.speculative`) chains it to draft several tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from nemojax import precision
from nemojax.blocks import block_class
from nemojax.config import ModelConfig
from nemojax.layers.common import Decoding, dense, normal, param
from nemojax.layers.norms import RMSNorm


class MTP(nn.Module):
    """(h [b, l, d], the next tokens' embeddings [b, l, d]) -> final-normed hidden states [b, l, d]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, hidden: Float[Array, "b l d"], next_embeddings: Float[Array, "b l d"],
                 decoding: Decoding | None = None, segment_ids: Int[Array, "b l"] | None = None
                 ) -> Float[Array, "b l d"]:
        cfg = self.cfg
        pdt, cdt, d = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype), cfg.hidden_size
        norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, pdt, name=name)  # noqa: E731
        both = jnp.concatenate([norm("enorm")(next_embeddings), norm("hnorm")(hidden)], axis=-1)
        eh_proj = param(self, "eh_proj", normal(cfg.initializer_range), (2 * d, d), (None, "embed"), pdt)
        x = dense(both, eh_proj, 1, cdt)
        block = block_class(cfg)
        for j, kind in enumerate(cfg.mtp_hybrid_override_pattern):
            x = block(cfg, kind, precision.layer_formats(cfg, (None,), kind), name=f"layers_{j}")(
                x, decoding, segment_ids)
        return norm("final_layernorm")(x)


def depth_targets(tokens: jnp.ndarray, mask: Bool[Array, "b l"] | None, depth: int
                  ) -> tuple[jnp.ndarray, Bool[Array, "b l2"]]:
    """The (tokens, mask) that make `nemojax.loss.lm_head_loss(hidden[:, :l - depth], head, ...)` depth
    `depth`'s loss: position t predicts tokens[t + depth + 1], a valid target only when the tokens
    t + 1 .. t + depth + 1 are all targets (no document starts between the context and the target)."""
    length = tokens.shape[1] - depth
    shifted = tokens[:, depth:]
    if mask is None:
        return shifted, jnp.ones(shifted.shape, bool)
    valid = mask[:, :length]
    for i in range(1, depth + 1):
        valid = valid & mask[:, i:i + length]
    return shifted, valid
