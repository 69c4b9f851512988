"""Nemotron Nano 2 9B. Hub: nvidia/NVIDIA-Nemotron-Nano-9B-v2."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = base.model_config(
        hybrid_override_pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
        hidden_size=4480, num_attention_heads=40, intermediate_size=15680, mamba_num_heads=128,
        mamba_head_dim=80, max_position_embeddings=131072, eos_token_id=12,
    )
    return c
