"""The `small` benchmark hybrid (~110M parameters): hidden 768, 12 attention heads / 4 kv, 24 Mamba heads.
benchmarks/forward.py and benchmarks/train_step.py time it."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = ml_collections.ConfigDict(dict(
        hybrid_override_pattern="M-M-M*-M-M-M*-", vocab_size=32000, hidden_size=768, num_attention_heads=12,
        num_key_value_heads=4, head_dim=64, intermediate_size=3072, mamba_num_heads=24, mamba_head_dim=64,
        ssm_state_size=128, n_groups=8, chunk_size=128, conv_kernel=4, eos_token_id=2,
        max_position_embeddings=16384,
    ))
    c.seq_len = 2048
    c.batch_size = 1
    c.dtype = "float32"
    c.remat = "none"  # small enough to keep every activation
    return c
