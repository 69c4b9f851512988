"""Nemotron 3 Super 120B-A12B. Hub: nvidia/NVIDIA-Nemotron-3-Super-120B-A12B."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = base.nemotron3_model_config(
        hybrid_override_pattern="MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
        hidden_size=4096, num_attention_heads=32, intermediate_size=2688, mamba_num_heads=128,
        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688,
        moe_shared_expert_intermediate_size=5376, moe_latent_size=1024, routed_scaling_factor=5.0,
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern='*E',
    )
    return c
