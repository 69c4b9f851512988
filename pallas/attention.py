"""Flash attention on accelerators through JAX's own kernels (none written here): splash attention
(Pallas, TPU) and cuDNN's fused attention (GPU). Their pure-JAX twin is
`nemojax/ops/attention.py::causal_attention`, the CPU default; `ModelConfig.attention_impl` chooses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jaxtyping import Array, Float, Int

from nemojax.ops.platform import target_backend

SPLASH_BLOCK = 128  # splash's default tile; sequences are padded to a multiple of it


def cudnn_causal_attention(q: Float[Array, "b l h d"], k: Float[Array, "b l g d"], v: Float[Array, "b l g d"],
                           segment_ids: Int[Array, "b l"] | None = None) -> Float[Array, "b l h d"]:
    """cuDNN flash attention (GPU only, bf16/fp16): grouped K/V heads are read in place, never repeated.
    Packed documents (`segment_ids`) pass as a [b, 1, l, l] mask, which cuDNN applies as a bias: its
    l^2 bytes per sequence bound the window length this serves (8k tokens: 64 MiB per sequence)."""
    mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def splash_causal_attention(q: Float[Array, "b l h d"], k: Float[Array, "b l g d"], v: Float[Array, "b l g d"],
                            segment_ids: Int[Array, "b l"] | None = None,
                            interpret: bool | None = None) -> Float[Array, "b l h d"]:
    """Splash attention (TPU; interpreted elsewhere): one multi-query kernel per K/V head, serving the
    query heads of its group; packed documents (`segment_ids`) through splash's own segment ids. Padded
    keys come after every real query, so the causal mask hides them."""
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
    if segment_ids is None:
        out = jax.vmap(jax.vmap(kernel))(q, k, v)  # [b, g, r, l, d]
    else:
        seg = jnp.pad(segment_ids, [(0, 0), (0, padded - length)], mode="edge")
        per_row = lambda q, k, v, s: jax.vmap(  # noqa: E731
            lambda q, k, v: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(q, k, v)
        out = jax.vmap(per_row)(q, k, v, seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, d)[:, :length]
