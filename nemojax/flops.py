"""Model FLOPs: the arithmetic a forward pass must do (matmuls, attention, SSD), for FLOP/s and MFU."""

from __future__ import annotations

from nemojax.blocks import KINDS
from nemojax.config import ModelConfig


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Multiply-adds x 2 of one forward pass; a backward pass costs twice this (so training is 3x).

    Counts every projection, causal attention (half of the full L x L product), and the chunked SSD's
    four contractions (C.B^T and its product with x inside chunks, chunk states, state read-out).
    Elementwise work (norms, activations, softmax) is not counted, as usual for MFU.
    """
    return _flops(cfg, cfg.hybrid_override_pattern, 2.0 * cfg.hidden_size * cfg.vocab_size, batch, seq_len)


def mtp_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """The forward FLOPs of the MTP depths: per depth eh_proj, the inner blocks and the shared LM head."""
    d = cfg.hidden_size
    per_depth = _flops(cfg, cfg.mtp_hybrid_override_pattern, 2.0 * 2 * d * d + 2.0 * d * cfg.vocab_size, batch, seq_len)
    return cfg.num_nextn_predict_layers * per_depth


def _flops(cfg: ModelConfig, pattern: str, extra_per_token: float, batch: int, seq_len: int) -> float:
    """The blocks of `pattern` plus `extra_per_token` (the head, MTP's eh_proj) over a batch."""
    per_token, per_sequence = extra_per_token, 0.0
    for kind in pattern:
        token, sequence = KINDS[kind].flops(cfg, seq_len)
        per_token, per_sequence = per_token + token, per_sequence + sequence
    return per_token * batch * seq_len + per_sequence * batch


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, with_mtp: bool = False) -> float:
    """Forward and backward; `with_mtp` when the MTP loss is trained (mtp.loss_weight > 0)."""
    return 3 * (forward_flops(cfg, batch, seq_len) + (mtp_flops(cfg, batch, seq_len) if with_mtp else 0.0))
