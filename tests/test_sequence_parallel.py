"""Sequence sharding (context parallelism) on 8 simulated devices (`tests/fixtures/sequence_parallel_check.py`,
run in the background from collection): the SSD scan, the depthwise conv and attention each against the
unsharded op, whole models against one device (values and every gradient), with shard boundaries mid-chunk
and at chunk edges, with and without packed documents that cross them; and the memory it saves."""

from __future__ import annotations

import pytest

from tests.test_sharding import check_results


@pytest.fixture(scope="module")
def results() -> dict:
    return check_results("sequence_parallel_check")


@pytest.mark.parametrize("op", ["ssd", "conv", "attention"])
def test_sequence_sharded_op_equals_the_unsharded_one(results, op):
    cases = {name: errors for name, errors in results.items() if name.startswith(op)}
    assert len(cases) >= 2, results
    for name, errors in cases.items():
        assert max(errors.values()) < 1e-5, (name, errors)


def test_sequence_sharded_models_equal_one_device(results):
    """Dense, MoE and LatentMoE models under sequence=4 (x data=2) and sequence=2 x fsdp=2 x tensor=2: the
    logits, the LM loss and every parameter's gradient of one device; the logits come out split on time."""
    cases = {name: r for name, r in results.items() if name.startswith("model_")}
    assert {name.split("_sequence")[0] for name in cases} == {"model_dense", "model_moe", "model_latent_moe"}
    for name, r in cases.items():
        assert r["logits"] < 1e-5 and r["loss"] < 1e-5 and r["grads"] < 1e-5, (name, r)
        assert r["logits_time_sharded"], name


def test_activation_memory_falls_with_the_sequence_shards(results):
    """The compiled forward and backward's per-device temporary memory for one long sequence halves from 2
    to 4 sequence shards."""
    memory = results["activation_memory"]
    assert memory["sequence4"] < 0.6 * memory["sequence2"], memory


def test_plan_extrapolates_long_sequences(results):
    """`nemojax.plan --fit`: the step's peak per-device memory at 8k tokens on 2 sequence shards, from
    XLA's analysis at 2k and 4k extrapolated along a line, is within 10% of the step compiled at 8k."""
    fit = results["plan_fit"]
    assert fit["fitted_from"] == [2048, 4096]
    assert abs(fit["fitted"] - fit["compiled"]) < 0.1 * fit["compiled"], fit
