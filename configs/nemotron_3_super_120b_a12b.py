"""Nemotron 3 Super 120B-A12B. Hub: nvidia/NVIDIA-Nemotron-3-Super-120B-A12B."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = base.model_config(
        hybrid_override_pattern="MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=2, intermediate_size=2688,
        mamba_num_heads=128, max_position_embeddings=262144, n_routed_experts=512, num_experts_per_tok=22,
        moe_intermediate_size=2688, moe_shared_expert_intermediate_size=5376, moe_latent_size=1024,
        n_shared_experts=1, routed_scaling_factor=5.0, n_group=1, topk_group=1, norm_topk_prob=True,
        num_nextn_predict_layers=1, eos_token_id=11, mtp_hybrid_override_pattern='*E',
    )
    return c
