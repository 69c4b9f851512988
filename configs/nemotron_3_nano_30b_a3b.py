"""Nemotron 3 Nano 30B-A3B. Hub: nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = base.nemotron3_model_config(
        hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        hidden_size=2688, num_attention_heads=32, intermediate_size=1856, mamba_num_heads=64,
        n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5,
    )
    return c
