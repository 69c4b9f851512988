"""Model FLOPs: the arithmetic a forward pass must do (matmuls, attention, SSD), for FLOP/s and MFU."""

from __future__ import annotations

from nemojax.config import ModelConfig


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Multiply-adds x 2 of one forward pass; a backward pass costs twice this (so training is 3x).

    Counts every projection, causal attention (half of the full L x L product), and the chunked SSD's
    four contractions (C.B^T and its product with x inside chunks, chunk states, state read-out).
    Elementwise work (norms, activations, softmax) is not counted, as usual for MFU.
    """
    d, t = cfg.hidden_size, batch * seq_len
    per_token = 0.0
    extra = 0.0
    for kind in cfg.hybrid_override_pattern:
        if kind == "M":
            h, p, g, n = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
            in_width = 2 * h * p + 2 * g * n + h
            per_token += 2 * d * in_width + 2 * h * p * d  # in and out projections
            q = min(cfg.chunk_size, seq_len)
            per_token += 2 * q * g * n + 2 * q * h * p  # within-chunk scores and their product with x
            per_token += 2 * 2 * h * p * n  # chunk states and the entering state's read-out
        elif kind == "*":
            nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            per_token += 2 * d * (nh + 2 * nkv) * hd + 2 * nh * hd * d
            extra += 2 * 2 * nh * hd * batch * seq_len * (seq_len + 1) / 2  # causal QK^T and PV
        elif kind == "-":
            per_token += 2 * 2 * d * cfg.intermediate_size
        else:
            m, f, k = cfg.moe_input_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
            per_token += 2 * d * cfg.n_routed_experts + k * 2 * 2 * m * f
            if cfg.moe_latent_size:
                per_token += 2 * 2 * d * m
            if cfg.n_shared_experts:
                per_token += 2 * 2 * d * cfg.moe_shared_expert_intermediate_size
    per_token += 2 * d * cfg.vocab_size  # LM head
    return per_token * t + extra


def train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    return 3 * forward_flops(cfg, batch, seq_len)
