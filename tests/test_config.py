"""ModelConfig.from_hf on every released config, round trips, and the promised error messages."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

import numpy as np
import pytest

from nemojax.blocks import hf_table
from nemojax.config import ConfigError, ModelConfig

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "configs", "*.json")))
# Nominal total parameter counts (billions) from the models' names / model cards.
NOMINAL = {"nemotron_h_4b": 4.5, "nemotron_h_8b": 8.1, "nemotron_h_47b": 47, "nemotron_h_56b": 56,
           "nemotron_nano_9b_v2": 8.9, "nemotron_nano_12b_v2": 12.3, "nemotron_3_nano_30b_a3b": 31.6,
           "nemotron_3_super_120b_a12b": 120, "nemotron_3_ultra_550b_a55b": 550}


def load(path):
    with open(path) as f:
        return json.load(f)


def test_fixtures_cover_every_released_model():
    assert {os.path.basename(p)[:-5] for p in FIXTURES} == set(NOMINAL)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: os.path.basename(p)[:-5])
def test_released_configs_load_and_round_trip(path):
    hf = load(path)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.num_hidden_layers == hf["num_hidden_layers"] == len(cfg.hybrid_override_pattern)
    assert cfg.head_dim == hf.get("head_dim", hf.get("attention_head_dim"))
    assert cfg.n_groups == hf.get("n_groups", hf.get("mamba_n_groups")) == 8
    assert cfg.time_step_limit == (0.0, math.inf)
    # Mamba inner width is heads x head_dim, not expand x hidden.
    h, p, g, n = hf["mamba_num_heads"], hf["mamba_head_dim"], cfg.n_groups, cfg.ssm_state_size
    in_proj = next(shape for entry in hf_table(cfg) for name, shape in entry.hf
                   if name == "backbone.layers.0.mixer.in_proj.weight")
    assert in_proj == (2 * h * p + 2 * g * n + h, hf["hidden_size"])
    billions = sum(int(np.prod(shape)) for entry in hf_table(cfg) for name, shape in entry.hf
                   if not name.startswith("mtp.")) / 1e9  # the nominal sizes count the backbone and head
    assert billions == pytest.approx(NOMINAL[os.path.basename(path)[:-5]], rel=0.03)

    again = ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf())), param_dtype=cfg.param_dtype,
                                dtype=cfg.dtype)
    assert again == cfg


def test_to_hf_is_read_by_transformers(tmp_path):
    from transformers import NemotronHConfig

    cfg = ModelConfig.from_hf(load([p for p in FIXTURES if "super" in p][0]))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf = NemotronHConfig.from_pretrained(tmp_path)
    assert list(hf.time_step_limit) == [0.0, math.inf]
    assert hf.hybrid_override_pattern == cfg.hybrid_override_pattern
    assert hf.moe_latent_size == 1024 and hf.num_nextn_predict_layers == 1
    assert hf.mtp_hybrid_override_pattern == "*E"


def test_layers_block_type_and_legacy_names_agree():
    hf = load([p for p in FIXTURES if "nano_30b" in p][0])
    listed = dict(hf)
    listed["layers_block_type"] = [{"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}[c]
                                   for c in listed.pop("hybrid_override_pattern")]
    assert ModelConfig.from_hf(listed) == ModelConfig.from_hf(hf)


BAD = [
    (dict(hybrid_override_pattern="M-X*"), "`hybrid_override_pattern` = 'M-X*'", "unknown pattern character 'X' at position 2"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "`num_attention_heads` = 6",
     "divisible by num_key_value_heads = 4"),
    (dict(mamba_num_heads=10, n_groups=4), "`mamba_num_heads` = 10", "divisible by n_groups = 4"),
    (dict(n_routed_experts=10, n_group=4), "`n_routed_experts` = 10", "divisible by n_group = 4"),
    (dict(topk_group=3, n_group=2), "`topk_group` = 3", "must be <= n_group = 2"),
    (dict(num_experts_per_tok=9), "`num_experts_per_tok` = 9", "must be <= topk_group x experts per group = 8"),
    (dict(num_hidden_layers=7), "`num_hidden_layers` = 7", "does not match the pattern's 5 layers"),
    (dict(model_type="llama"), "`model_type` = 'llama'", "expected 'nemotron_h'"),
    (dict(mlp_hidden_act="gelu"), "`mlp_hidden_act` = 'gelu'", "only 'relu2'"),
    (dict(hidden_size=0), "`hidden_size` = 0", "positive integer"),
    (dict(layers_block_type=["mamba", "conv"], hybrid_override_pattern=None), "`layers_block_type`",
     "unknown block type 'conv' at position 1"),
]


@pytest.mark.parametrize("change,field,rule", BAD, ids=[b[1] for b in BAD])
def test_malformed_configs_are_rejected_with_field_value_and_rule(change, field, rule):
    hf = dict(hybrid_override_pattern="MEM*E", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, n_routed_experts=8,
              num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64, vocab_size=100)
    ModelConfig.from_hf(hf)  # the base is valid
    hf.update(change)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf(hf)
    assert field in str(err.value) and rule in str(err.value)


def test_config_is_frozen():
    cfg = ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3  # type: ignore[misc]
