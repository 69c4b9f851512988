"""A checkpoint that does not match its config gets one error naming every offending tensor."""

from __future__ import annotations

import json
import shutil

import ml_dtypes  # noqa: F401
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nemojax
from nemojax.checkpoint.hf import CheckpointError


@pytest.fixture()
def broken(hf_checkpoints, tmp_path):
    """A copy of the dense checkpoint whose tensors the test may edit."""
    _, path = hf_checkpoints("dense")
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    tensors = load_file(dst / "model.safetensors")

    def write(edit):
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        return str(dst)

    return write


def test_every_problem_is_listed_with_expected_and_found_shapes(broken):
    def edit(t):
        del t["backbone.layers.1.mixer.up_proj.weight"]
        t["backbone.layers.0.mixer.in_proj.weight"] = t["backbone.layers.0.mixer.in_proj.weight"][:-1]
        t["backbone.layers.9.mixer.foo.weight"] = np.zeros((3, 3), np.float32)
        t["mtp.layers.0.eh_proj.weight"] = np.zeros((4, 4), np.float32)

    path = broken(edit)
    with pytest.raises(CheckpointError) as err:
        nemojax.load_hf(path)
    msg = str(err.value)
    assert "4 problems" in msg
    assert "missing:     backbone.layers.1.mixer.up_proj.weight (expected shape (52, 40))" in msg
    assert ("mis-shaped:  backbone.layers.0.mixer.in_proj.weight [model.safetensors]: expected (138, 40), "
            "found (137, 40)") in msg
    assert "unexpected:  backbone.layers.9.mixer.foo.weight [model.safetensors] shape (3, 3)" in msg
    assert "unsupported: mtp.layers.0.eh_proj.weight" in msg and "MTP" in msg


def test_missing_config_and_missing_shard(broken, tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        nemojax.load_hf(str(tmp_path))
    path = broken(lambda t: None)
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00002.safetensors"
                                            for name in load_file(f"{path}/model.safetensors")}}
    with open(f"{path}/model.safetensors.index.json", "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: shard listed in"):
        nemojax.load_hf(path)
