"""Grouped-query causal self-attention with no positional embedding (the `*` block)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.config import ModelConfig
from nemojax.layers.common import Decoding, Gemms, dense, normal, param
from nemojax.ops.attention import attention_at, cached_attention, causal_attention
from nemojax.ops.sequence_parallel import attention_sequence_sharded
from nemojax.sharding import SEQUENCE_AXIS, sequence_axis_size, shard_map_logical


def causal_attention_of(cfg: ModelConfig, segment_ids: jax.Array | None = None):
    """(q, k, v) -> attention output by `cfg.attention_impl`: the XLA blockwise attention, or a fused
    kernel (cuDNN, splash) run on each device's own (batch, heads) shard. `segment_ids`: packed
    documents kept apart. Under a sequence-sharded mesh, each device's queries attend to the all-gathered
    keys and values (`ops/sequence_parallel.py`)."""
    impl = cfg.kernel_impls()[1]
    q_axes, kv_axes = ("batch", "length", "heads", None), ("batch", "length", "kv_heads", None)
    if sequence_axis_size() > 1:
        kernel = functools.partial(attention_sequence_sharded, axis=SEQUENCE_AXIS)
    elif impl == "xla":
        return lambda q, k, v: causal_attention(q, k, v, segment_ids)
    else:
        from pallas import attention

        kernel = {"cudnn": attention.cudnn_causal_attention, "splash": attention.splash_causal_attention}[impl]
    if segment_ids is None:
        return shard_map_logical(kernel, in_axes=(q_axes, kv_axes, kv_axes), out_axes=q_axes)
    packed = shard_map_logical(kernel, in_axes=(q_axes, kv_axes, kv_axes, ("batch", "length")), out_axes=q_axes)
    return lambda q, k, v: packed(q, k, v, segment_ids)


def _write_new(cache: jax.Array, new: jax.Array, step: jax.Array | int) -> jax.Array:
    """Write the new tokens' [b, kv_heads, t, head_dim] keys (or values) at each row's `step` (a scalar
    when every row advances together: one slice update, not a scatter)."""
    if jnp.ndim(step) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, step, axis=2)
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=1))(cache, new, step)


class Attention(nn.Module):
    """Under decoding, keys and values are cached: the prompt's, and the new tokens' (see `Decoding`)."""

    cfg: ModelConfig
    gemms: Gemms = Gemms()

    @nn.compact
    def __call__(self, u: Float[Array, "b l d"], decoding: Decoding | None = None,
                 segment_ids: Int[Array, "b l"] | None = None) -> Float[Array, "b l d"]:
        cfg = self.cfg
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = normal(cfg.initializer_range)
        gemm = lambda name: self.gemms.of(self, name)  # noqa: E731
        q = dense(u, param(self, "q_proj", init, (d, nh, hd), ("embed", "heads", "head_dim"), pdt), 1, cdt,
                  gemm("q_proj"))
        k = dense(u, param(self, "k_proj", init, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), pdt), 1, cdt,
                  gemm("k_proj"))
        v = dense(u, param(self, "v_proj", init, (d, nkv, hd), ("embed", "kv_heads", "head_dim"), pdt), 1, cdt,
                  gemm("v_proj"))
        chunk = decoding is not None and decoding.prefill and decoding.prompt_length not in (0, u.shape[1])
        if (decoding is None or decoding.prefill) and not chunk:
            out = causal_attention_of(cfg, segment_ids)(q, k, v)  # fp32 softmax; K/V heads shared, never repeated
        if decoding is not None:
            # The prompt's keys and values are written once, at prefill; each decoding step writes its
            # own into a separate buffer (one slot per new token, from the row's `step`). Updating a
            # whole context-long cache inside the decode loop made XLA copy it every step.
            shape = (u.shape[0], nkv, decoding.max_new_tokens, hd)
            k_new, v_new = (self.variable("cache", name, jnp.zeros, shape, cdt) for name in ("new_k", "new_v"))
            if decoding.prefill:  # [b, kv_heads, prompt length, head_dim], this call's at its offset
                shape = (u.shape[0], nkv, decoding.prompt_length or u.shape[1], hd)
                k_prompt, v_prompt = (self.variable("cache", name, jnp.zeros, shape, cdt)
                                      for name in ("prompt_k", "prompt_v"))
                k_prompt.value, v_prompt.value = (_write_new(cache.value, new.transpose(0, 2, 1, 3), decoding.offset)
                                                  for cache, new in ((k_prompt, k), (v_prompt, v)))
                if chunk:  # the chunk's queries against the prompt's keys so far
                    out = attention_at(q, k_prompt.value.transpose(0, 2, 1, 3), v_prompt.value.transpose(0, 2, 1, 3),
                                       decoding.offset)
            else:
                k_prompt, v_prompt = self.get_variable("cache", "prompt_k"), self.get_variable("cache", "prompt_v")
                k_new.value = _write_new(k_new.value, k.transpose(0, 2, 1, 3), decoding.step)
                v_new.value = _write_new(v_new.value, v.transpose(0, 2, 1, 3), decoding.step)
                t = u.shape[1]
                seen = jnp.broadcast_to(decoding.step, (u.shape[0],))[:, None] + jnp.arange(1, t + 1)  # causal
                out = cached_attention(q, (k_prompt, k_new.value), (v_prompt, v_new.value),
                                       (jnp.broadcast_to(decoding.lengths[:, None], seen.shape), seen))
        w_o = param(self, "o_proj", init, (nh, hd, d), ("heads", "head_dim", "embed"), pdt)
        return dense(out, w_o, 2, cdt, gemm("o_proj"))
