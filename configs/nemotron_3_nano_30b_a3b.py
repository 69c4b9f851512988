"""Nemotron 3 Nano 30B-A3B. Hub: nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = base.model_config(
        hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        hidden_size=2688, num_attention_heads=32, num_key_value_heads=2, intermediate_size=1856,
        mamba_num_heads=64, max_position_embeddings=262144, n_routed_experts=128, num_experts_per_tok=6,
        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712, moe_latent_size=None,
        n_shared_experts=1, routed_scaling_factor=2.5, n_group=1, topk_group=1, norm_topk_prob=True,
        num_nextn_predict_layers=0, eos_token_id=11,
    )
    return c
