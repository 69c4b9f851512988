"""The squared-ReLU MLP (the `-` block, and the MoE's shared expert)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nemojax.config import ModelConfig
from nemojax.layers.common import dense, normal, param


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


class MLP(nn.Module):
    cfg: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, u: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        cfg = self.cfg
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        init = normal(cfg.initializer_range)
        up = param(self, "up_proj", init, (cfg.hidden_size, self.intermediate_size), ("embed", "mlp"), pdt)
        down = param(self, "down_proj", init, (self.intermediate_size, cfg.hidden_size), ("mlp", "embed"), pdt)
        return dense(relu2(dense(u, up, 1, cdt)), down, 1, cdt)
