"""RMSNorm and the grouped, gated RMSNorm that closes the Mamba-2 mixer."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from nemojax.layers.common import param
from nemojax.ops.sums import sum_last, sum_leading


def rms_normalize(x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    """x / rms(x) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: Float[Array, "... d"], scale: Float[Array, " d"], eps: float) -> Float[Array, "... d"]:
    """scale * x / rms(x): fp32 statistics and scale, result in the input dtype."""
    return (rms_normalize(x, eps) * scale.astype(jnp.float32)).astype(x.dtype)


def _rms_norm_fwd(x, scale, eps):
    return rms_norm(x, scale, eps), (x, scale)


def _rms_norm_bwd(eps, res, d_out):
    x, scale = res
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    normed = x32 * rstd
    d_normed = d_out.astype(jnp.float32) * scale.astype(jnp.float32)
    dx = rstd * (d_normed - normed * (sum_last(d_normed * normed) / x.shape[-1])[..., None])
    # As a token contraction: XLA:CPU's reduction over leading axes is ~30 ms here, the dot ~1 ms.
    flat = (-1, x.shape[-1])
    d_scale = jnp.einsum("td,td->d", d_out.astype(jnp.float32).reshape(flat), normed.reshape(flat))
    return dx.astype(x.dtype), d_scale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nn.Module):
    """Pre-norm of every block and the final norm: fp32 statistics and scale, result in the input dtype."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        scale = param(self, "scale", jax.nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
        return rms_norm(x, scale, self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gated_group_rms_norm(y: Float[Array, "b l h p"], z: Float[Array, "b l h p"], scale: Float[Array, "h p"],
                         n_groups: int, eps: float) -> Float[Array, "b l h p"]:
    """scale * RMSNorm(y * silu(z)), statistics over `n_groups` equal slices of the heads; fp32 result."""
    return _gated_norm_parts(y, z, scale, n_groups, eps)[0]


def _gated_norm_parts(y, z, scale, n_groups, eps):
    *lead, heads, head_dim = y.shape
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    grouped = gated.reshape(*lead, n_groups, (heads // n_groups) * head_dim)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(grouped), axis=-1, keepdims=True) + eps)
    normed = (grouped * rstd).reshape(y.shape)
    return scale.astype(jnp.float32) * normed, normed, rstd


def _gated_norm_fwd(y, z, scale, n_groups, eps):
    out, _, rstd = _gated_norm_parts(y, z, scale, n_groups, eps)
    return out, (y, z, scale, rstd)


def _gated_norm_bwd(n_groups, eps, res, d_out):
    y, z, scale, rstd = res
    *lead, heads, head_dim = y.shape
    y32, z32 = y.astype(jnp.float32), z.astype(jnp.float32)
    sig = jax.nn.sigmoid(z32)
    silu = z32 * sig
    grouped_shape = (*lead, n_groups, (heads // n_groups) * head_dim)
    normed = ((y32 * silu).reshape(grouped_shape) * rstd)
    d_normed = (d_out.astype(jnp.float32) * scale.astype(jnp.float32)).reshape(grouped_shape)
    d_gated = (rstd * (d_normed - normed * (sum_last(d_normed * normed) / normed.shape[-1])[..., None]))
    d_gated = d_gated.reshape(y.shape)
    d_scale = sum_leading(d_out.astype(jnp.float32) * normed.reshape(y.shape), len(lead))
    dy = d_gated * silu
    dz = d_gated * y32 * sig * (1 + z32 * (1 - sig))
    return dy.astype(y.dtype), dz.astype(z.dtype), d_scale.astype(scale.dtype)


gated_group_rms_norm.defvjp(_gated_norm_fwd, _gated_norm_bwd)


class GatedGroupRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) with statistics taken over `n_groups` equal slices of the heads.

    Groups follow the SSM's B/C groups, so each tensor-parallel shard of heads normalises on its own.
    The backward is written by hand: autodiff through the grouped reshape cost ~8x the forward on CPU.
    """

    n_groups: int
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: Float[Array, "b l h p"], z: Float[Array, "b l h p"]) -> Float[Array, "b l h p"]:
        scale = param(self, "scale", jax.nn.initializers.ones, y.shape[-2:], ("ssm_heads", "ssm_head_dim"),
                      self.param_dtype)
        return gated_group_rms_norm(y, z, scale, self.n_groups, self.eps)
