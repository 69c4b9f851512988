"""Inference batches padded to a few lengths, so generation and scoring compile few shapes."""

from __future__ import annotations


def bucket_length(length: int) -> int:
    """Prompt batches are padded to a few lengths, so similar batches share one compilation."""
    return max(16, 1 << (length - 1).bit_length()) if length <= 256 else -(-length // 256) * 256
