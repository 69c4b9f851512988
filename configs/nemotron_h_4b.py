"""Nemotron-H-4B. Hub: nvidia/Nemotron-H-4B-Base-8K."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = base.model_config(
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        hidden_size=3072, num_attention_heads=32, intermediate_size=12288, mamba_num_heads=112,
        max_position_embeddings=8192,
    )
    return c
