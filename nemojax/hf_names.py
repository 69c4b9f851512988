"""Hugging Face Hub tensors <-> nemojax parameters, one mixer kind at a time (`nemojax.blocks.hf_table`
walks a whole model's pattern with them).

Each `Entry` ties a group of Hub tensors to a group of nemojax parameters with a pair of pure numpy
functions, one per direction, so loading, Orbax conversion and export all read this file and nothing else.
Groups exist because the layouts differ in shape, not only in name:
- `in_proj.weight` [z | x | B | C | dt] is split into five weights (clean tensor-parallel sharding);
- `conv1d.weight` / `conv1d.bias` are split into x, B, C channel groups the same way;
- per-expert `experts.{e}.up_proj.weight` tensors are stacked into one [experts, in, out] weight;
- linear weights are stored [in..., out...] (HF: [out, in]).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from nemojax.config import ModelConfig

Shape = tuple[int, ...]
ParamPath = tuple[str, ...]
Convert = Callable[[list[np.ndarray]], list[np.ndarray]]

# Hub tensors a config can leave out, and why finding them anyway is an error.
UNSUPPORTED_PREFIXES = {"mtp.": "MTP layers, but config.json has num_nextn_predict_layers = 0 (set it to load them)"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """Hub tensors `hf` <-> nemojax parameters `ours`, with shapes on both sides."""

    hf: tuple[tuple[str, Shape], ...]
    ours: tuple[tuple[ParamPath, Shape], ...]
    to_ours: Convert
    to_hf: Convert


def _prod(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def copy(hf_name: str, path: ParamPath, hf_shape: Shape, our_shape: Shape | None = None) -> Entry:
    """Same values, possibly reshaped (norm scales, A_log, D, dt_bias, embeddings)."""
    our_shape = our_shape or hf_shape
    return Entry(((hf_name, hf_shape),), ((path, our_shape),),
                 lambda a: [a[0].reshape(our_shape)], lambda a: [a[0].reshape(hf_shape)])


def linear(hf_name: str, path: ParamPath, in_shape: Shape, out_shape: Shape) -> Entry:
    """HF [out, in] weight <-> ours [*in_shape, *out_shape]."""
    hf_shape = (_prod(out_shape), _prod(in_shape))
    our_shape = (*in_shape, *out_shape)
    return Entry(((hf_name, hf_shape),), ((path, our_shape),),
                 lambda a: [a[0].T.reshape(our_shape)],
                 lambda a: [a[0].reshape(hf_shape[1], hf_shape[0]).T])


def split_rows(hf_name: str, hf_cols: Shape, parts: Sequence[tuple[ParamPath, Shape]],
               to_ours_part: Callable[[np.ndarray, Shape], np.ndarray],
               to_hf_part: Callable[[np.ndarray, int], np.ndarray]) -> Entry:
    """One HF tensor whose first axis concatenates several of our parameters."""
    sizes = [_prod(shape) // _prod(hf_cols) for _, shape in parts]  # rows each part takes
    hf_shape = (sum(sizes), *hf_cols)
    bounds = np.cumsum(sizes)[:-1]

    def to_ours(a):
        return [to_ours_part(piece, shape) for piece, (_, shape) in zip(np.split(a[0], bounds), parts)]

    def to_hf(a):
        return [np.concatenate([to_hf_part(t, size) for t, size in zip(a, sizes)], axis=0)]

    return Entry(((hf_name, hf_shape),), tuple(parts), to_ours, to_hf)


def _linear_part(piece: np.ndarray, shape: Shape) -> np.ndarray:  # [out, in] -> [in, *out]
    return piece.T.reshape(shape)


def _linear_part_back(t: np.ndarray, size: int) -> np.ndarray:
    return t.reshape(t.shape[0], size).T


def _conv_part(piece: np.ndarray, shape: Shape) -> np.ndarray:  # [channels, 1, width] -> [width, *channels]
    return piece[:, 0, :].T.reshape(shape)


def _conv_part_back(t: np.ndarray, size: int) -> np.ndarray:
    return t.reshape(t.shape[0], size).T[:, None, :]


def _bias_part(piece: np.ndarray, shape: Shape) -> np.ndarray:
    return piece.reshape(shape)


def _bias_part_back(t: np.ndarray, size: int) -> np.ndarray:
    return t.reshape(size)


def stacked_experts(hf_names: Sequence[str], path: ParamPath, in_size: int, out_size: int) -> Entry:
    """Per-expert HF [out, in] weights <-> ours [experts, in, out]."""
    n = len(hf_names)
    return Entry(tuple((name, (out_size, in_size)) for name in hf_names), ((path, (n, in_size, out_size)),),
                 lambda a: [np.stack([w.T for w in a])],
                 lambda a: [np.ascontiguousarray(w.T) for w in a[0]])


def mamba_entries(cfg: ModelConfig, hf: str, ours: ParamPath) -> list[Entry]:
    d, h, p, g, n, k = (cfg.hidden_size, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups,
                        cfg.ssm_state_size, cfg.conv_kernel)
    m = lambda name: (*ours, name)  # noqa: E731
    entries = [
        split_rows(f"{hf}.in_proj.weight", (d,),
                   [(m("in_z"), (d, h, p)), (m("in_x"), (d, h, p)), (m("in_B"), (d, g, n)),
                    (m("in_C"), (d, g, n)), (m("in_dt"), (d, h))],
                   _linear_part, _linear_part_back),
    ]
    if cfg.use_bias:
        entries.append(split_rows(f"{hf}.in_proj.bias", (),
                                  [(m("in_z_bias"), (h, p)), (m("in_x_bias"), (h, p)), (m("in_B_bias"), (g, n)),
                                   (m("in_C_bias"), (g, n)), (m("in_dt_bias"), (h,))],
                                  _bias_part, _bias_part_back))
    entries += [
        split_rows(f"{hf}.conv1d.weight", (1, k),
                   [(m("conv_x"), (k, h, p)), (m("conv_B"), (k, g, n)), (m("conv_C"), (k, g, n))],
                   _conv_part, _conv_part_back),
    ]
    if cfg.use_conv_bias:
        entries.append(split_rows(f"{hf}.conv1d.bias", (),
                                  [(m("conv_x_bias"), (h, p)), (m("conv_B_bias"), (g, n)),
                                   (m("conv_C_bias"), (g, n))],
                                  _bias_part, _bias_part_back))
    entries += [
        copy(f"{hf}.dt_bias", m("dt_bias"), (h,)),
        copy(f"{hf}.A_log", m("A_log"), (h,)),
        copy(f"{hf}.D", m("D"), (h,)),
        copy(f"{hf}.norm.weight", (*ours, "norm", "scale"), (h * p,), (h, p)),
        linear(f"{hf}.out_proj.weight", m("out_proj"), (h, p), (d,)),
    ]
    if cfg.use_bias:
        entries.append(copy(f"{hf}.out_proj.bias", m("out_proj_bias"), (d,)))
    return entries


def attention_entries(cfg: ModelConfig, hf: str, ours: ParamPath) -> list[Entry]:
    d, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return [
        linear(f"{hf}.q_proj.weight", (*ours, "q_proj"), (d,), (nh, hd)),
        linear(f"{hf}.k_proj.weight", (*ours, "k_proj"), (d,), (nkv, hd)),
        linear(f"{hf}.v_proj.weight", (*ours, "v_proj"), (d,), (nkv, hd)),
        linear(f"{hf}.o_proj.weight", (*ours, "o_proj"), (nh, hd), (d,)),
    ]


def _projection(cfg: ModelConfig, hf: str, ours: ParamPath, in_size: int, out_size: int) -> list[Entry]:
    """An HF nn.Linear `hf` (weight, and bias when mlp_bias) <-> our `ours` and `{ours}_bias`."""
    entries = [linear(f"{hf}.weight", ours, (in_size,), (out_size,))]
    if cfg.mlp_bias:
        entries.append(copy(f"{hf}.bias", (*ours[:-1], f"{ours[-1]}_bias"), (out_size,)))
    return entries


def mlp_entries(cfg: ModelConfig, hf: str, ours: ParamPath, inter: int) -> list[Entry]:
    d = cfg.hidden_size
    return (_projection(cfg, f"{hf}.up_proj", (*ours, "up_proj"), d, inter)
            + _projection(cfg, f"{hf}.down_proj", (*ours, "down_proj"), inter, d))


def moe_entries(cfg: ModelConfig, hf: str, ours: ParamPath) -> list[Entry]:
    d, e, f, m = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.moe_input_size
    entries = [
        linear(f"{hf}.gate.weight", (*ours, "router"), (d,), (e,)),
        copy(f"{hf}.gate.e_score_correction_bias", (*ours, "e_score_correction_bias"), (e,)),
        stacked_experts([f"{hf}.experts.{i}.up_proj.weight" for i in range(e)], (*ours, "experts_up"), m, f),
        stacked_experts([f"{hf}.experts.{i}.down_proj.weight" for i in range(e)], (*ours, "experts_down"), f, m),
    ]
    if cfg.moe_latent_size:
        entries += (_projection(cfg, f"{hf}.fc1_latent_proj", (*ours, "fc1_latent_proj"), d, m)
                    + _projection(cfg, f"{hf}.fc2_latent_proj", (*ours, "fc2_latent_proj"), m, d))
    if cfg.n_shared_experts:
        entries += mlp_entries(cfg, f"{hf}.shared_experts", (*ours, "shared_experts"),
                                cfg.moe_shared_expert_intermediate_size)
    return entries
