"""Nemotron 3 Ultra 550B-A55B.

Not confirmed from a released config.json: sizes, pattern and MoE settings follow docs/models.md,
which marks them (?). Check them against the checkpoint before training from it.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = base.nemotron3_model_config(
        hybrid_override_pattern="MEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        hidden_size=8192, num_attention_heads=64, intermediate_size=5120, mamba_num_heads=256,
        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=5120,
        moe_shared_expert_intermediate_size=10240, moe_latent_size=2048, routed_scaling_factor=5.0,
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern='*E',
    )
    return c
