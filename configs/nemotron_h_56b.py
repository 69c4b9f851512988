"""Nemotron-H-56B. Hub: nvidia/Nemotron-H-56B-Base-8K."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = base.model_config(
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        hidden_size=8192, num_attention_heads=64, intermediate_size=32768, mamba_num_heads=256,
        ssm_state_size=256, max_position_embeddings=8192,
    )
    return c
