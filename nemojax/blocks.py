"""The block kinds of a hybrid pattern, in one table: what each pattern character builds, which Hub
tensors it has, what it costs, and whether it mixes positions (keeps a decoding cache, sees document boundaries).

`KINDS[char]` is read by `Block` (the pre-norm residual block the backbone and the MTP module stack),
`hf_table` (the checkpoint name table of a whole model), `nemojax.flops`, `nemojax.precision` (which
linear layers a low-precision recipe can quantize) and generation; a new kind
needs one entry here. config.py keeps
only the pattern characters' config.json spellings (`BLOCK_TYPES`, `HF_BLOCK_NAMES`), which it needs to
parse a config before any of this exists.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax import precision

from nemojax.config import BLOCK_TYPES, ModelConfig
from nemojax.hf_names import Entry, ParamPath, attention_entries, copy, linear, mamba_entries, mlp_entries, moe_entries
from nemojax.layers.attention import Attention
from nemojax.layers.common import Decoding, Gemms
from nemojax.layers.mamba2 import Mamba2Mixer
from nemojax.layers.mlp import MLP
from nemojax.layers.moe import MoE
from nemojax.layers.norms import RMSNorm


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

    mixer: Callable[[ModelConfig, Gemms], nn.Module]  # builds the block's mixer (named "mixer")
    hf_entries: Callable[[ModelConfig, str, ParamPath], list[Entry]]  # its Hub tensors under a prefix
    flops: Callable[[ModelConfig, int], tuple[float, float]]  # forward (per token, per sequence) at a length
    mixes_positions: bool  # a sequence mixer: called with the `Decoding` spec (it keeps a cache) and segment ids
    linears: Callable[[ModelConfig], tuple[str, ...]]  # its linear layers, as the Hub names them under `mixer`


def _moe_linears(cfg: ModelConfig) -> tuple[str, ...]:
    names = ("experts.up_proj", "experts.down_proj")
    if cfg.moe_latent_size:
        names += ("fc1_latent_proj", "fc2_latent_proj")
    if cfg.n_shared_experts:
        names += ("shared_experts.up_proj", "shared_experts.down_proj")
    return names


KINDS: dict[str, BlockKind] = {
    "M": BlockKind(lambda cfg, gemms: Mamba2Mixer(cfg, gemms, name="mixer"), mamba_entries, _mamba_flops,
                   mixes_positions=True, linears=lambda cfg: ("in_proj", "out_proj")),
    "*": BlockKind(lambda cfg, gemms: Attention(cfg, gemms, name="mixer"), attention_entries, _attention_flops,
                   mixes_positions=True, linears=lambda cfg: precision.ATTENTION),
    "-": BlockKind(lambda cfg, gemms: MLP(cfg, cfg.intermediate_size, gemms, name="mixer"),
                   lambda cfg, hf, ours: mlp_entries(cfg, hf, ours, cfg.intermediate_size), _mlp_flops,
                   mixes_positions=False, linears=lambda cfg: ("up_proj", "down_proj")),
    "E": BlockKind(lambda cfg, gemms: MoE(cfg, gemms, name="mixer"), moe_entries, _moe_flops, mixes_positions=False,
                   linears=_moe_linears),
}
assert KINDS.keys() == BLOCK_TYPES.keys()


class Block(nn.Module):
    """x + mixer(RMSNorm(x)). Sequence mixers also get the decoding spec and the packed documents'
    `segment_ids` (nemojax/ops: each document then sees only itself). `formats`: the linear layers'
    low-precision formats (`precision.layer_formats`), per repeat when scanned (`repeat`: which one)."""

    cfg: ModelConfig
    kind: str
    formats: precision.LayerFormats = ()

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"], decoding: Decoding | None = None,
                 segment_ids: Int[Array, "b l"] | None = None, repeat: Int[Array, ""] | None = None
                 ) -> Float[Array, "b l d"]:
        normed = RMSNorm(self.cfg.layer_norm_epsilon, jnp.dtype(self.cfg.param_dtype), name="norm")(x)
        kind = KINDS[self.kind]
        mixer = kind.mixer(self.cfg, Gemms(self.formats, repeat))
        y = mixer(normed, decoding, segment_ids) if kind.mixes_positions else mixer(normed)
        return x + y.astype(x.dtype)


def block_class(cfg: ModelConfig, scanned: bool = False) -> type[Block]:
    """Block, rematerialised in the backward pass when `cfg.remat` asks (inside a scan the loop already
    keeps the recomputation apart, so common-subexpression elimination need not be prevented)."""
    if cfg.remat == "none":
        return Block
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None
    return nn.remat(Block, policy=policy, prevent_cse=not scanned)


def hf_table(cfg: ModelConfig) -> list[Entry]:
    """Every Hub tensor of a model with this config (backbone, head, MTP), and the nemojax parameter
    (per-layer layout) it becomes: the one name table loading, conversion and export read."""
    d = cfg.hidden_size
    entries = [copy("backbone.embeddings.weight", ("embed",), (cfg.vocab_size, d))]
    for i, kind in enumerate(cfg.hybrid_override_pattern):
        entries += _block_entries(cfg, kind, f"backbone.layers.{i}", (f"layers_{i}",))
    entries.append(copy("backbone.norm_f.weight", ("norm_f", "scale"), (d,)))
    if not cfg.tie_word_embeddings:
        entries.append(linear("lm_head.weight", ("lm_head",), (d,), (cfg.vocab_size,)))
    if cfg.num_nextn_predict_layers:
        entries += _mtp_table(cfg)
    return entries


def _block_entries(cfg: ModelConfig, kind: str, hf: str, ours: ParamPath) -> list[Entry]:
    """One `Block`'s tensors: its pre-norm and its mixer's."""
    return ([copy(f"{hf}.norm.weight", (*ours, "norm", "scale"), (cfg.hidden_size,))]
            + KINDS[kind].hf_entries(cfg, f"{hf}.mixer", (*ours, "mixer")))


def _mtp_table(cfg: ModelConfig) -> list[Entry]:
    """The MTP module's tensors (`nemojax.mtp`): its inner blocks are `mtp.layers.{j}`; the first also
    holds enorm, hnorm and eh_proj, the last the final layernorm."""
    d, last = cfg.hidden_size, len(cfg.mtp_hybrid_override_pattern) - 1
    entries = [copy("mtp.layers.0.enorm.weight", ("mtp", "enorm", "scale"), (d,)),
               copy("mtp.layers.0.hnorm.weight", ("mtp", "hnorm", "scale"), (d,)),
               linear("mtp.layers.0.eh_proj.weight", ("mtp", "eh_proj"), (2 * d,), (d,))]
    for j, kind in enumerate(cfg.mtp_hybrid_override_pattern):
        entries += _block_entries(cfg, kind, f"mtp.layers.{j}", ("mtp", f"layers_{j}"))
    entries.append(copy(f"mtp.layers.{last}.final_layernorm.weight", ("mtp", "final_layernorm", "scale"), (d,)))
    return entries
