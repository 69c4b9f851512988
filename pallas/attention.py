"""Flash attention on accelerators through JAX's own kernels (none written here): splash attention
(Pallas, TPU) and cuDNN's fused attention (GPU). Their pure-JAX twin is
`nemojax/ops/attention.py::causal_attention`, the CPU default; `ModelConfig.attention_impl` chooses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jaxtyping import Array, Float

from nemojax.ops.platform import target_backend

SPLASH_BLOCK = 128  # splash's default tile; sequences are padded to a multiple of it


def cudnn_causal_attention(q: Float[Array, "b l h d"], k: Float[Array, "b l g d"],
                           v: Float[Array, "b l g d"]) -> Float[Array, "b l h d"]:
    """cuDNN flash attention (GPU only, bf16/fp16): grouped K/V heads are read in place, never repeated."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def splash_causal_attention(q: Float[Array, "b l h d"], k: Float[Array, "b l g d"],
                            v: Float[Array, "b l g d"], interpret: bool | None = None) -> Float[Array, "b l h d"]:
    """Splash attention (TPU; interpreted elsewhere): one multi-query kernel per K/V head, serving the
    query heads of its group. Padded keys come after every real query, so the causal mask hides them."""
    b, length, h, d = q.shape
    g = k.shape[2]
    interpret = target_backend() != "tpu" if interpret is None else interpret
    padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
    pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(t, pad) for t in (q * jnp.asarray(d ** -0.5, q.dtype), k, v))
    mask = masks.MultiHeadMask([masks.CausalMask((padded, padded))] * (h // g))
    kernel = splash.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, interpret=interpret,
                                    block_sizes=splash.BlockSizes.get_default())
    q = q.reshape(b, padded, g, h // g, d).transpose(0, 2, 3, 1, 4)  # [b, g, r, l, d]
    k, v = (t.transpose(0, 2, 1, 3) for t in (k, v))  # [b, g, l, d]
    out = jax.vmap(jax.vmap(kernel))(q, k, v)  # [b, g, r, l, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, d)[:, :length]
