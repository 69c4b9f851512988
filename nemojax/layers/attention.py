"""Grouped-query causal self-attention with no positional embedding (the `*` block)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nemojax.config import ModelConfig
from nemojax.layers.common import dense, normal, param


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, u: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        cfg = self.cfg
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = normal(cfg.initializer_range)
        q = dense(u, param(self, "q_proj", init, (d, nh, hd), ("embed", "heads", "head_dim"), pdt),
                  "bld,dhk->blhk", cdt)
        k = dense(u, param(self, "k_proj", init, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), pdt),
                  "bld,dhk->blhk", cdt)
        v = dense(u, param(self, "v_proj", init, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), pdt),
                  "bld,dhk->blhk", cdt)
        # XLA's implementation: logits and softmax in fp32, GQA without materialising repeated K/V.
        out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(hd), is_causal=True)
        w_o = param(self, "o_proj", init, (nh, hd, d), ("heads", "head_dim", "embed"), pdt)
        return dense(out, w_o, "blhk,hkd->bld", cdt)
