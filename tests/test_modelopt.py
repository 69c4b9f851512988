"""ModelOpt's quantized Hub layout (`nemojax/checkpoint/modelopt.py`): FP8 and NVFP4 checkpoints written here
from the documented tensor names and formats load as their dequantized weights; missing or mis-shaped scales
get the one error list; `nemojax-convert orbax-to-hf --quantize` writes that layout back, bit for bit."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from nemojax import convert, quant
from nemojax.blocks import hf_table
from nemojax.checkpoint.hf import CheckpointError, SafetensorsCheckpoint, load_hf
from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from tests.test_quant import E2M1, E4M3, cast

# Widths NVFP4's 16-blocks divide; Mamba layers 0 and 6 are away from attention (3), 4 is next to it.
CFG = dict(vocab_size=256, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
           intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=16, n_groups=2, conv_kernel=4,
           chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1, hybrid_override_pattern="M-E*M-M",
           eos_token_id=10, bos_token_id=None)
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 29)).astype(np.int32)


def is_linear(name: str) -> bool:
    return name.endswith("_proj.weight") and ".mixer." in name


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A random model (weights moved off their init) as Hub tensors, and its directory."""
    cfg = ModelConfig(**CFG)
    params = nn.unbox(NemotronH(cfg).init(jax.random.key(0), jnp.asarray(TOKENS))["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    tensors = {}
    for entry in hf_table(cfg):
        values = [np.asarray(params_at(params, path)) for path, _ in entry.ours]
        tensors.update({name: np.ascontiguousarray(t, np.float32)
                        for (name, _), t in zip(entry.hf, entry.to_hf(values))})
    path = str(tmp_path_factory.mktemp("dense"))
    write(path, cfg, tensors)
    return cfg, tensors, path


def params_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def write(path: str, cfg: ModelConfig, tensors: dict, quant_config: dict | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    if any(t.dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.uint8) for t in tensors.values()):
        save_torch({n: torch.from_numpy(np.array(t).view(np.uint8)).view(torch.float8_e4m3fn)
                    if t.dtype == np.dtype(ml_dtypes.float8_e4m3fn) else torch.from_numpy(np.array(t))
                    for n, t in tensors.items()}, os.path.join(path, "model.safetensors"))
    else:
        save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg.to_hf(), "torch_dtype": "float32"}, f)
    if quant_config:
        with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": {"name": "modelopt", "version": "0.37.0"}, "quantization": quant_config}, f)


# ----- the layout, written here from its documentation ---------------------------------------------------


def modelopt_fp8(w: np.ndarray) -> tuple[dict, np.ndarray]:
    scale = np.float32(np.abs(w).max()) / np.float32(448)
    values = cast(w / scale, E4M3)
    return {".weight": values, ".weight_scale": np.array(scale, np.float32)}, values.astype(np.float32) * scale


def modelopt_nvfp4(w: np.ndarray) -> tuple[dict, np.ndarray]:
    """E2M1 codes two per byte (even element low), an E4M3 scale per 16 inputs, the fp32 global scale."""
    global_scale = np.float32(np.abs(w).max()) / np.float32(6 * 448)
    blocks = w.reshape(w.shape[0], -1, 16)
    scales = cast(np.abs(blocks).max(-1) / np.float32(6) / global_scale, E4M3)
    step = scales.astype(np.float32)[..., None] * global_scale
    values = cast(blocks / np.where(step > 0, step, 1), E2M1)
    codes = values.view(np.uint8).reshape(w.shape) & 0xF
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    stored = {".weight": packed, ".weight_scale": scales, ".weight_scale_2": np.array(global_scale, np.float32)}
    dense = values.astype(np.float32) * scales.astype(np.float32)[..., None] * global_scale  # in that order
    return stored, dense.reshape(w.shape)


QUANTIZERS = {"FP8": modelopt_fp8, "NVFP4": modelopt_nvfp4}


def release(dense_tensors: dict, algorithm: str) -> tuple[dict, dict]:
    """(stored tensors, the dense tensors they stand for) of a release quantizing every linear layer but
    attention, with a static input scale each."""
    stored, dequantized = {}, {}
    for name, w in dense_tensors.items():
        if is_linear(name) and not name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            module = name.removesuffix(".weight")
            parts, dequantized[name] = QUANTIZERS[algorithm](w)
            stored.update({module + s: v for s, v in parts.items()})
            stored[module + ".input_scale"] = np.array(0.01, np.float32)
        else:
            stored[name] = dequantized[name] = w
    return stored, dequantized


RELEASE_CONFIG = {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 16,
                  "exclude_modules": ["lm_head", "backbone.layers.3.mixer*"]}


def logits(cfg_params):
    cfg, params = cfg_params
    return np.asarray(NemotronH(cfg).apply({"params": params}, jnp.asarray(TOKENS)))


@pytest.mark.parametrize("algorithm", ["FP8", "NVFP4"])
def test_a_quantized_release_loads_as_its_dequantized_weights(dense, tmp_path, algorithm):
    cfg, tensors, _ = dense
    stored, dequantized = release(tensors, algorithm)
    write(str(tmp_path / "q"), cfg, stored, dict(RELEASE_CONFIG, quant_algo=algorithm))
    write(str(tmp_path / "d"), cfg, dequantized)
    quantized, reference = load_hf(str(tmp_path / "q")), load_hf(str(tmp_path / "d"))
    jax.tree.map(np.testing.assert_array_equal, quantized[1], reference[1])
    np.testing.assert_array_equal(logits(quantized), logits(reference))
    assert not np.array_equal(dequantized["backbone.layers.0.mixer.in_proj.weight"],
                              tensors["backbone.layers.0.mixer.in_proj.weight"])  # it was quantized
    if algorithm == "FP8":  # the converter reads it the same way
        from nemojax.checkpoint.conversion import hf_to_orbax
        from nemojax.checkpoint.loading import load_model

        hf_to_orbax(str(tmp_path / "q"), str(tmp_path / "orbax"))
        jax.tree.map(np.testing.assert_array_equal, load_model(str(tmp_path / "orbax"))[1], reference[1])


@pytest.mark.parametrize("algorithm", ["FP8", "NVFP4"])
def test_missing_or_misshaped_scales_get_one_error_list(dense, tmp_path, algorithm):
    cfg, tensors, _ = dense
    stored, _ = release(tensors, algorithm)
    del stored["backbone.layers.0.mixer.in_proj.weight_scale"]
    stored["backbone.layers.2.mixer.experts.1.up_proj.weight_scale"] = np.ones((3,), np.float32)
    stored["backbone.layers.3.mixer.q_proj.weight_scale"] = np.ones((), np.float32)  # beside a bf16 weight
    write(str(tmp_path), cfg, stored, dict(RELEASE_CONFIG, quant_algo=algorithm))
    with pytest.raises(CheckpointError) as error:
        load_hf(str(tmp_path))
    message = str(error.value)
    assert "(3 problems)" in message, message
    assert "missing:     backbone.layers.0.mixer.in_proj.weight_scale" in message
    assert "mis-shaped:  backbone.layers.2.mixer.experts.1.up_proj.weight_scale: expected" in message
    assert "backbone.layers.3.mixer.q_proj.weight_scale" in message


def test_a_quantized_weight_the_config_excludes_is_an_error(dense, tmp_path):
    cfg, tensors, _ = dense
    stored, _ = release(tensors, "FP8")
    write(str(tmp_path), cfg, stored, dict(RELEASE_CONFIG, quant_algo="FP8",
                                            exclude_modules=["lm_head", "backbone.layers.0.*"]))
    with pytest.raises(CheckpointError, match=r"layers.0.mixer.in_proj.weight is stored as FP8 .* says unquantized"):
        load_hf(str(tmp_path))


# ----- export ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orbax_checkpoint(dense, tmp_path_factory):
    from nemojax.checkpoint.conversion import hf_to_orbax

    path = str(tmp_path_factory.mktemp("orbax") / "ckpt")
    hf_to_orbax(dense[2], path)
    return path


# Serving recipe on M-E*M-M: attention (3) and the Mamba layer beside it (4) stay unquantized.
EXPORTED = ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj", "backbone.layers.1.mixer.up_proj",
            "backbone.layers.1.mixer.down_proj", "backbone.layers.5.mixer.up_proj", "backbone.layers.5.mixer.down_proj",
            "backbone.layers.6.mixer.in_proj", "backbone.layers.6.mixer.out_proj",
            "backbone.layers.2.mixer.shared_experts.up_proj", "backbone.layers.2.mixer.shared_experts.down_proj",
            *[f"backbone.layers.2.mixer.experts.{e}.{p}" for e in range(4) for p in ("up_proj", "down_proj")]]


# RMS logit error over RMS logit, on random weights (no structure for quantization to keep; measured 0.052
# and 0.20): the trained tiny model's loss change is in the README.
@pytest.mark.parametrize("recipe, bound", [("fp8", 0.08), ("nvfp4", 0.3)])
def test_quantized_export_round_trips_bit_for_bit(dense, orbax_checkpoint, tmp_path, recipe, bound):
    """The export quantizes exactly the recipe's layers with nemojax.quant's quantizers (read back: bit for
    bit), declares the rest excluded, calibrates static input scales, and its logits stay within `bound`
    (RMS error over RMS) of the unquantized model's."""
    cfg, tensors, dense_dir = dense
    out = str(tmp_path / "exported")
    assert convert.main(["orbax-to-hf", orbax_checkpoint, out, "--quantize", recipe, "--calibration-batches", "2",
                         "--calibration-seq-len", "64"]) == 0
    with open(os.path.join(out, "hf_quant_config.json")) as f:
        section = json.load(f)["quantization"]
    assert section["quant_algo"] == recipe.upper()
    excluded = {"lm_head", "backbone.layers.3.mixer.q_proj", "backbone.layers.4.mixer.in_proj"}
    assert excluded <= set(section["exclude_modules"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "modelopt"
    with SafetensorsCheckpoint(out) as ckpt:
        assert sorted(ckpt.quantized) == sorted(m + ".weight" for m in EXPORTED)
        for module in EXPORTED:
            w = jnp.asarray(tensors[module + ".weight"])
            q = quant.fp8(w) if recipe == "fp8" else quant.nvfp4(w, (1, 16))
            np.testing.assert_array_equal(ckpt.read(module + ".weight"), np.asarray(q.dequantize()))
            assert 0 < float(ckpt.read_stored(module + ".input_scale")) < np.inf
        for name in tensors:
            if name.removesuffix(".weight") not in EXPORTED:
                np.testing.assert_array_equal(ckpt.read(name), tensors[name])
        # The calibrated input scale of layer 0's in_proj: the largest |RMSNorm(embedding)| over the
        # calibration windows, over the format's largest value.
        input_scale = float(ckpt.read_stored("backbone.layers.0.mixer.in_proj.input_scale"))
    from nemojax.checkpoint.ptq import calibration_batches

    embed, norm = tensors["backbone.embeddings.weight"], tensors["backbone.layers.0.norm.weight"]
    x = embed[np.concatenate(calibration_batches(cfg, "synthetic", "", 2, 64))]
    normed = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.layer_norm_epsilon) * norm
    top = 448 if recipe == "fp8" else 6 * 448
    np.testing.assert_allclose(input_scale, np.abs(normed).max() / top, rtol=1e-5)
    exported, reference = logits(load_hf(out)), logits(load_hf(dense_dir))
    error = np.sqrt(np.mean((exported - reference) ** 2) / np.mean(reference ** 2))
    assert 0 < error < bound, error
