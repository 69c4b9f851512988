"""The squared-ReLU MLP (the `-` block, and the MoE's shared expert)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nemojax.config import ModelConfig
from nemojax.layers.common import Gemms, normal, projection


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


class MLP(nn.Module):
    cfg: ModelConfig
    intermediate_size: int
    gemms: Gemms = Gemms()

    @nn.compact
    def __call__(self, u: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        cfg = self.cfg
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        init = normal(cfg.initializer_range)
        d, f = cfg.hidden_size, self.intermediate_size
        hidden = relu2(projection(self, "up_proj", u, init, (d, f), ("embed", "mlp"), 1, cfg.mlp_bias, pdt, cdt,
                                  self.gemms.of(self, "up_proj")))
        return projection(self, "down_proj", hidden, init, (f, d), ("mlp", "embed"), 1, cfg.mlp_bias, pdt, cdt,
                          self.gemms.of(self, "down_proj"))
