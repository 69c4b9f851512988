"""The default run: a 1.9M-parameter hybrid with every block type, trained on the CPU in minutes on the
synthetic byte-level language (associative recall + arithmetic), e.g.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model = ml_collections.ConfigDict(dict(
        hybrid_override_pattern="M*EM-*", vocab_size=256, hidden_size=192, tie_word_embeddings=False,
        num_attention_heads=4, num_key_value_heads=2, head_dim=48, intermediate_size=512,
        mamba_num_heads=8, mamba_head_dim=48, ssm_state_size=32, n_groups=2, conv_kernel=4, chunk_size=64,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        moe_shared_expert_intermediate_size=256, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        eos_token_id=10, bos_token_id=None, pad_token_id=0, max_position_embeddings=4096,
    ))
    c.total_steps = 600
    c.batch_size = 8
    c.seq_len = 128
    c.dtype = "float32"
    c.remat = "none"  # small enough to keep every activation
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 30
    c.optimizer.weight_decay = 0.01
    c.checkpoint_every = 100
    c.log_every = 10
    c.eval_every = 200
    return c
