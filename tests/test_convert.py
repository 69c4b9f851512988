"""The converter: HF -> Orbax -> HF round trips, sharding, bad input, memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nemojax.checkpoint.hf import SafetensorsCheckpoint
from nemojax.convert import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensors(path):
    with SafetensorsCheckpoint(path) as ckpt:
        return {name: ckpt.read(name) for name in ckpt.names()}


@pytest.mark.parametrize("kind", ["moe", "latent_moe", "biases", "tied"])
def test_round_trip_is_bit_identical_and_transformers_reads_it(tmp_path, hf_checkpoints, kind):
    from transformers import AutoModelForCausalLM

    model, src = hf_checkpoints(kind, "sharded")  # several shards + index in
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    assert main(["hf-to-orbax", src, str(tmp_path / "orbax")]) == 0
    assert main(["orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--max-shard-size", "40KB"]) == 0
    out = str(tmp_path / "hf")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # several shards + index out

    original, converted = tensors(src), tensors(out)
    assert sorted(original) == sorted(converted)
    for name, value in original.items():
        assert converted[name].dtype == value.dtype and converted[name].shape == value.shape, name
        np.testing.assert_array_equal(converted[name], value, err_msg=name)

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reloaded.config._experts_implementation = "eager"
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert os.path.exists(os.path.join(out, "generation_config.json"))  # copied along


def test_single_file_out_and_bf16_and_init_from_reads_it(tmp_path, hf_checkpoints):
    import jax

    from nemojax.checkpoint.hf import load_hf
    from nemojax.checkpoint.orbax_io import load_params, read_model_config

    _, src = hf_checkpoints("dense")
    assert main(["hf-to-orbax", src, str(tmp_path / "orbax"), "--dtype", "bfloat16"]) == 0
    cfg = read_model_config(str(tmp_path / "orbax"))
    assert cfg.param_dtype == "bfloat16"
    _, reference = load_hf(src, param_dtype="bfloat16")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), reference)
    restored = load_params(str(tmp_path / "orbax"), abstract)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert main(["orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")
    assert json.load(open(tmp_path / "hf" / "config.json"))["dtype"] == "bfloat16"


# ----- bad input ---------------------------------------------------------------------------------
def rewrite(src, dst, change):
    """Copy a single-file checkpoint, passing its tensors (a dict) through `change`."""
    from safetensors.numpy import save_file

    shutil.copytree(src, dst)
    values = change(tensors(src))
    save_file(values, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def edit_config(path, **fields):
    config = json.load(open(os.path.join(path, "config.json")))
    config.update(fields)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))


NORM = "backbone.layers.0.norm.weight"
BAD_INPUTS = {
    "missing": (lambda t: {k: v for k, v in t.items() if k != NORM}, f"missing:     {NORM}"),
    "unexpected": (lambda t: {**t, "backbone.extra.weight": np.ones(3, np.float32)},
                   "unexpected:  backbone.extra.weight"),
    "mis-shaped": (lambda t: {**t, NORM: np.ones(7, np.float32)}, f"mis-shaped:  {NORM} [model.safetensors]"),
    "dtype": (lambda t: {**t, NORM: t[NORM].astype(np.float64)}, f"tensor {NORM} has dtype F64"),
}


@pytest.mark.parametrize("case", [*BAD_INPUTS, "model_type", "truncated", "not_a_checkpoint"])
def test_bad_input_fails_cleanly_and_leaves_no_output(tmp_path, hf_checkpoints, capsys, case):
    _, good = hf_checkpoints("dense")
    src = str(tmp_path / "src")
    if case in BAD_INPUTS:
        change, expected = BAD_INPUTS[case]
        rewrite(good, src, change)
    elif case == "model_type":
        shutil.copytree(good, src)
        edit_config(src, model_type="llama")
        expected = "config field `model_type` = 'llama': expected 'nemotron_h'"
    elif case == "truncated":
        shutil.copytree(good, src)
        weights = os.path.join(src, "model.safetensors")
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) - 100)
        expected = f"{weights}: not a readable safetensors file"
    else:
        os.makedirs(src)
        expected = "config.json: not found"
    dst = tmp_path / "dst"
    assert main(["hf-to-orbax", src, str(dst)]) == 1
    assert expected in capsys.readouterr().err
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary left either


def test_existing_destination_needs_force_and_the_command_line_exit_status(tmp_path, hf_checkpoints):
    _, src = hf_checkpoints("dense")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    cmd = [sys.executable, "-m", "nemojax.convert", "hf-to-orbax", src, str(dst)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1 and "exists; pass --force" in proc.stderr
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["hf-to-orbax", src, str(dst), "--force"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["assets", "model", "params"]


# ----- memory --------------------------------------------------------------------------------------
def test_peak_memory_stays_under_half_the_checkpoint():
    """Both directions convert a generated 1.7 GB checkpoint of ~34 MB layers with a peak RSS under half
    its size (tests/fixtures/convert_memory_check.py; conftest.py starts it at collection: it waits on
    the disk more than on the CPU)."""
    from tests.test_sharding import check_results

    result = check_results("convert_memory_check")
    size, peaks = result["size"], result["peaks"]
    print(f"checkpoint {size / 1e6:.0f} MB, peak RSS " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in peaks.items()))
    assert size >= 300e6  # (larger than the 300 MB asked: the process alone starts at ~200 MB)
    assert set(peaks) == {"hf-to-orbax", "orbax-to-hf"}
    assert all(peak < size / 2 for peak in peaks.values()), (size, peaks)
