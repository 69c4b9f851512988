"""Grouped-query causal self-attention with no positional embedding (the `*` block)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from nemojax.config import ModelConfig
from nemojax.layers.common import dense, normal, param
from nemojax.ops.attention import causal_attention


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, u: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        cfg = self.cfg
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = normal(cfg.initializer_range)
        q = dense(u, param(self, "q_proj", init, (d, nh, hd), ("embed", "heads", "head_dim"), pdt), 1, cdt)
        k = dense(u, param(self, "k_proj", init, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), pdt), 1, cdt)
        v = dense(u, param(self, "v_proj", init, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), pdt), 1, cdt)
        out = causal_attention(q, k, v)  # fp32 scores and softmax; K/V heads shared, never repeated
        w_o = param(self, "o_proj", init, (nh, hd, d), ("heads", "head_dim", "embed"), pdt)
        return dense(out, w_o, 2, cdt)
