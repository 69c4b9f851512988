"""The hybrid stack: embedding, one pre-norm residual block per pattern character, final norm, LM head."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax import precision
from nemojax.blocks import block_class
from nemojax.config import ModelConfig
from nemojax.layers.common import Decoding, normal, param
from nemojax.layers.norms import RMSNorm
from nemojax.mtp import MTP
from nemojax.scan_layers import layer_runs
from nemojax.sharding import constrain_activations


class Period(nn.Module):
    """One period of a repeating pattern (its blocks in order): the body of a layer scan."""

    cfg: ModelConfig
    kinds: str
    formats: tuple[precision.LayerFormats, ...] = ()  # per block of the period (each per repeat)

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"], decoding: Decoding | None,
                 segment_ids: Int[Array, "b l"] | None, repeat: Int[Array, ""]) -> tuple[Float[Array, "b l d"], None]:
        block = block_class(self.cfg, scanned=True)
        for j, kind in enumerate(self.kinds):
            x = constrain_activations(block(self.cfg, kind, self.formats[j], name=f"block_{j}")(
                x, decoding, segment_ids, repeat))
        return x, None


def scanned_period(cfg: ModelConfig, kinds: str, repeats: int) -> type[nn.Module]:
    """`Period` scanned `repeats` times, its parameters, caches and sown values stacked on axis 0; the
    repeat's index goes in as the scanned input (it picks each layer's low-precision format)."""
    return nn.scan(Period, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                   split_rngs={"params": True, precision.RNG_STREAM: True}, in_axes=(nn.broadcast, nn.broadcast, 0),
                   length=repeats, metadata_params={nn.PARTITION_NAME: "layers"})


class NemotronH(nn.Module):
    """Nemotron-H / Nano 2 / Nemotron 3 causal LM: int32 token ids [B, L] -> float32 logits [B, L, V].

    `apply(..., method="hidden")` returns the final-norm hidden states instead, and `head_weight` the
    [embed, vocab] LM head, so a loss can fuse the head with the cross-entropy (`nemojax.loss`).
    `prefill` and `decode` are cached inference (`nemojax.generate`): apply them with
    `mutable=["cache"]`; the "cache" collection holds each Mamba layer's conv and SSM states and each
    attention layer's keys and values. With `num_nextn_predict_layers`, `mtp_depths` and `mtp_hidden` run
    the MTP module (`nemojax.mtp`), whose parameters are under "mtp".
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = param(self, "embed", normal(cfg.initializer_range), (cfg.vocab_size, cfg.hidden_size),
                           ("vocab", "embed"), pdt)
        # Blocks are `layers_{i}`, or with cfg.scan_layers each repeated run is one `scan_{start}`.
        self.runs = layer_runs(cfg.hybrid_override_pattern, cfg.scan_layers)
        for run in self.runs:
            if run.scanned:
                formats = tuple(precision.layer_formats(cfg, tuple(run.layer(r, j) for r in range(run.repeats)), kind)
                                for j, kind in enumerate(run.period))
                setattr(self, run.key, scanned_period(cfg, run.period, run.repeats)(cfg, run.period, formats))
            else:
                setattr(self, run.key, block_class(cfg)(cfg, run.period,
                                                        precision.layer_formats(cfg, (run.start,), run.period)))
        self.norm_f = RMSNorm(cfg.layer_norm_epsilon, pdt)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(self, "lm_head", normal(cfg.initializer_range), (cfg.hidden_size, cfg.vocab_size),
                                 ("embed", "vocab"), pdt)
        if cfg.num_nextn_predict_layers:
            self.mtp = MTP(cfg)

    def embed_tokens(self, input_ids: Int[Array, "b l"]) -> Float[Array, "b l d"]:
        return constrain_activations(jnp.take(self.embed, input_ids, axis=0).astype(jnp.dtype(self.cfg.dtype)))

    def hidden(self, input_ids: Int[Array, "b l"], decoding: Decoding | None = None,
               segment_ids: Int[Array, "b l"] | None = None) -> Float[Array, "b l d"]:
        """Final-norm hidden states; `segment_ids` (non-decreasing per row) keeps packed documents apart:
        each then gets exactly the hidden states it gets alone."""
        x = self.embed_tokens(input_ids)
        for run in self.runs:
            if run.scanned:
                x, _ = getattr(self, run.key)(x, decoding, segment_ids, jnp.arange(run.repeats))
            else:
                x = constrain_activations(getattr(self, run.key)(x, decoding, segment_ids))
        return self.norm_f(x)

    def head_weight(self) -> Float[Array, "d v"]:
        return self.embed.T if self.cfg.tie_word_embeddings else self.lm_head

    def logits(self, hidden: Float[Array, "*t d"]) -> Float[Array, "*t v"]:
        head = self.head_weight().astype(jnp.dtype(self.cfg.dtype))
        return jnp.einsum("...d,dv->...v", hidden, head).astype(jnp.float32)

    def __call__(self, input_ids: Int[Array, "b l"]) -> Float[Array, "b l v"]:
        hidden = self.hidden(input_ids)
        if self.is_initializing() and self.cfg.num_nextn_predict_layers:
            self.mtp_depths(hidden, input_ids)  # creates the MTP parameters
        return self.logits(hidden)

    def mtp_hidden(self, hidden: Float[Array, "b l d"], next_ids: Int[Array, "b l"],
                   decoding: Decoding | None = None, segment_ids: Int[Array, "b l"] | None = None
                   ) -> Float[Array, "b l d"]:
        """One MTP depth (`nemojax.mtp`): from `hidden[:, t]` and the token after what it has seen,
        `next_ids[:, t]`, the hidden state that predicts the token after that."""
        return self.mtp(hidden, self.embed_tokens(next_ids), decoding, segment_ids)

    def mtp_depths(self, hidden: Float[Array, "b l d"], tokens: Int[Array, "b l"],
                   segment_ids: Int[Array, "b l"] | None = None) -> list[Float[Array, "b l d"]]:
        """The `num_nextn_predict_layers` depths over a sequence, from the backbone's `hidden`: depth d's
        output at t predicts tokens[:, t + d + 1] (its last d positions read padding and predict nothing)."""
        outputs = []
        for depth in range(1, self.cfg.num_nextn_predict_layers + 1):
            next_ids = jnp.pad(tokens[:, depth:], [(0, 0), (0, depth)])
            hidden = self.mtp_hidden(hidden, next_ids, segment_ids=segment_ids)
            outputs.append(hidden)
        return outputs

    def prefill(self, input_ids: Int[Array, "b l"], lengths: Int[Array, " b"], max_new_tokens: int,
                offset: Int[Array, ""] | int = 0, prompt_length: int = 0) -> Float[Array, "b v"]:
        """Fill fresh caches from right-padded prompts of `lengths` real tokens, with room for
        `max_new_tokens` more; returns the logits after each prompt's last token. A chunked prefill
        (`nemojax.generate.chunked_prefill`) calls this once per chunk of a `prompt_length`-token prompt,
        the chunk starting at `offset`, with the caches so far; the logits are then after each row's last
        token in this chunk. (Speculative decoding calls `hidden` with its own `Decoding`.)"""
        decoding = Decoding(lengths, offset=offset, prefill=True, max_new_tokens=max_new_tokens,
                            prompt_length=prompt_length)
        x = self.hidden(input_ids, decoding)
        return self.logits(x[jnp.arange(x.shape[0]), jnp.clip(lengths - 1 - offset, 0, x.shape[1] - 1)])

    def decode(self, tokens: Int[Array, " b"], lengths: Int[Array, " b"], step: Int[Array, ""]
               ) -> Float[Array, "b v"]:
        """Advance every row by its `step`-th new token (at position lengths[b] + step); returns the
        next logits."""
        return self.logits(self.hidden(tokens[:, None], Decoding(lengths, step))[:, 0])
