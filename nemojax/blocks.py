"""The block kinds of a hybrid pattern, in one table: what each pattern character builds, which Hub
tensors it has, what it costs, and whether it keeps a cache when decoding.

`KINDS[char]` is read by the model (mixers), `hf_table` (the checkpoint name table of a whole model),
`nemojax.flops` and generation; a new kind, or MTP's inner blocks, needs one entry here. config.py keeps
only the pattern characters' config.json spellings (`BLOCK_TYPES`, `HF_BLOCK_NAMES`), which it needs to
parse a config before any of this exists.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

from nemojax.config import BLOCK_TYPES, ModelConfig
from nemojax.hf_names import Entry, ParamPath, attention_entries, copy, linear, mamba_entries, mlp_entries, moe_entries
from nemojax.layers.attention import Attention
from nemojax.layers.mamba2 import Mamba2Mixer
from nemojax.layers.mlp import MLP
from nemojax.layers.moe import MoE


def _mamba_flops(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    h, p, g, n, d = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size, cfg.hidden_size
    q = min(cfg.chunk_size, seq_len)
    per_token = 2 * d * (2 * h * p + 2 * g * n + h) + 2 * h * p * d  # in and out projections
    per_token += 2 * q * g * n + 2 * q * h * p  # within-chunk scores and their product with x
    per_token += 2 * 2 * h * p * n  # chunk states and the entering state's read-out
    return per_token, 0.0


def _attention_flops(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_sequence = 2 * 2 * nh * hd * seq_len * (seq_len + 1) / 2  # causal QK^T and PV
    return 2 * d * (nh + 2 * nkv) * hd + 2 * nh * hd * d, per_sequence


def _mlp_flops(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    return 2 * 2 * cfg.hidden_size * cfg.intermediate_size, 0.0


def _moe_flops(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    d, m, f, k = cfg.hidden_size, cfg.moe_input_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    per_token = 2 * d * cfg.n_routed_experts + k * 2 * 2 * m * f
    if cfg.moe_latent_size:
        per_token += 2 * 2 * d * m
    if cfg.n_shared_experts:
        per_token += 2 * 2 * d * cfg.moe_shared_expert_intermediate_size
    return per_token, 0.0


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """One pattern character."""

    mixer: Callable[[ModelConfig], nn.Module]  # builds the block's mixer (named "mixer")
    hf_entries: Callable[[ModelConfig, str, ParamPath], list[Entry]]  # its Hub tensors under a prefix
    flops: Callable[[ModelConfig, int], tuple[float, float]]  # forward (per token, per sequence) at a length
    cached: bool  # keeps a decoding cache, so it is called with the `Decoding` spec


KINDS: dict[str, BlockKind] = {
    "M": BlockKind(lambda cfg: Mamba2Mixer(cfg, name="mixer"), mamba_entries, _mamba_flops, cached=True),
    "*": BlockKind(lambda cfg: Attention(cfg, name="mixer"), attention_entries, _attention_flops, cached=True),
    "-": BlockKind(lambda cfg: MLP(cfg, cfg.intermediate_size, name="mixer"),
                   lambda cfg, hf, ours: mlp_entries(cfg, hf, ours, cfg.intermediate_size), _mlp_flops, cached=False),
    "E": BlockKind(lambda cfg: MoE(cfg, name="mixer"), moe_entries, _moe_flops, cached=False),
}
assert KINDS.keys() == BLOCK_TYPES.keys()


def hf_table(cfg: ModelConfig) -> list[Entry]:
    """Every Hub tensor of a backbone with this config, and the nemojax parameter (per-layer layout) it
    becomes: the one name table loading, conversion and export read."""
    d = cfg.hidden_size
    entries = [copy("backbone.embeddings.weight", ("embed",), (cfg.vocab_size, d))]
    for i, kind in enumerate(cfg.hybrid_override_pattern):
        hf, ours = f"backbone.layers.{i}", (f"layers_{i}",)
        entries.append(copy(f"{hf}.norm.weight", (*ours, "norm", "scale"), (d,)))
        entries += KINDS[kind].hf_entries(cfg, f"{hf}.mixer", (*ours, "mixer"))
    entries.append(copy("backbone.norm_f.weight", ("norm_f", "scale"), (d,)))
    if not cfg.tie_word_embeddings:
        entries.append(linear("lm_head.weight", ("lm_head",), (d,), (cfg.vocab_size,)))
    return entries
