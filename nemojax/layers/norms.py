"""RMSNorm and the grouped, gated RMSNorm that closes the Mamba-2 mixer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nemojax.layers.common import param


def rms_normalize(x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    """x / rms(x) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """Pre-norm of every block and the final norm: fp32 statistics and scale, result in the input dtype."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        scale = param(self, "scale", jax.nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
        return (rms_normalize(x, self.eps) * scale.astype(jnp.float32)).astype(x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) with statistics taken over `n_groups` equal slices of the heads.

    Groups follow the SSM's B/C groups, so each tensor-parallel shard of heads normalises on its own.
    """

    n_groups: int
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Float[Array, "b l h p"], z: Float[Array, "b l h p"]) -> Float[Array, "b l h p"]:
        *lead, heads, head_dim = y.shape
        scale = param(self, "scale", jax.nn.initializers.ones, (heads, head_dim), ("ssm_heads", "ssm_head_dim"),
                      self.param_dtype)
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        grouped = gated.reshape(*lead, self.n_groups, (heads // self.n_groups) * head_dim)
        normed = rms_normalize(grouped, self.eps).reshape(*lead, heads, head_dim)
        return scale.astype(jnp.float32) * normed.astype(y.dtype)
