"""Scanning over repeated groups of blocks (nemojax/scan_layers.py): the runs, the scanned model against
the unrolled one (values, gradients, a whole train step, cached decoding), checkpoints in both layouts,
and a lowered program whose size does not grow with depth."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import ConfigError, ModelConfig
from nemojax.model import NemotronH
from nemojax.scan_layers import layer_runs, stack_layers, unstack_layers
from tests.conftest import BASE, MOE

# A lone M, then period "E*-M" three times: every block kind inside a scan, MoE stats stacked.
PATTERN = "ME*-ME*-ME*-M"
CFG = ModelConfig(**BASE, **MOE, hybrid_override_pattern=PATTERN)
SCANNED = dataclasses.replace(CFG, scan_layers=True)
TOKENS = jax.random.randint(jax.random.key(5), (2, 21), 0, CFG.vocab_size)


def blocks_compiled(runs) -> int:
    return sum(len(r.period) for r in runs)


def cheapest_cover(pattern: str) -> int:
    """Brute force over every way to cut the pattern into pieces, each a lone block or k >= 2 repeats."""
    @functools.lru_cache(None)
    def best(i: int) -> int:
        if i == len(pattern):
            return 0
        options = [1 + best(i + 1)]
        for m in range(1, len(pattern) - i + 1):
            for k in range(2, (len(pattern) - i) // m + 1):
                if pattern[i:i + m * k] == pattern[i:i + m] * k:
                    options.append(m + best(i + m * k))
        return min(options)
    return best(0)


def test_runs_cover_the_pattern_with_the_fewest_compiled_blocks():
    rng = np.random.default_rng(0)
    patterns = ["".join(rng.choice(list("M-*E"), size=rng.integers(1, 14), p=[0.4, 0.4, 0.1, 0.1]))
                for _ in range(60)]
    patterns += ["M-" * 7, "MEMEM*EMEMEM*EMEMEM*EM", "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"]
    for pattern in patterns:
        runs = layer_runs(pattern)
        assert "".join(r.period * r.repeats for r in runs) == pattern
        assert [r.start for r in runs] == list(itertools.accumulate([0] + [r.stop - r.start for r in runs]))[:-1]
        assert all(r.repeats >= 2 or len(r.period) == 1 for r in runs)
        assert blocks_compiled(runs) == cheapest_cover(pattern), pattern
    assert blocks_compiled(layer_runs(patterns[-1])) == 13  # Nemotron-H-8B: 52 blocks compile as 13
    assert all(r.repeats == 1 for r in layer_runs("M-M-", scan=False))


@pytest.fixture(scope="module")
def params():
    @jax.jit  # one compilation for the init and the perturbation
    def perturbed_init(key):
        leaves, tree = jax.tree.flatten(nn.unbox(NemotronH(CFG).init(key, TOKENS)["params"]))
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                         for p, k in zip(leaves, keys)])
    return perturbed_init(jax.random.key(0))


def test_init_gives_the_stacked_layout_with_a_layers_axis(params):
    boxed = jax.eval_shape(NemotronH(SCANNED).init, jax.random.key(0), TOKENS)["params"]
    assert [(r.start, r.period, r.repeats) for r in layer_runs(PATTERN)] == [(0, "M", 1), (1, "E*-M", 3)]
    assert sorted(boxed) == ["embed", "layers_0", "lm_head", "norm_f", "scan_1"]
    in_z = boxed["scan_1"]["block_3"]["mixer"]["in_z"]
    assert in_z.names[0] == "layers" and in_z.value.shape == (3, *params["layers_0"]["mixer"]["in_z"].shape)
    assert jax.tree.map(lambda x: x.shape, stack_layers(params, PATTERN)) == jax.tree.map(
        lambda x: x.shape, nn.unbox(boxed))
    back = unstack_layers(stack_layers(params, PATTERN), PATTERN)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_model_equals_the_unrolled_one(params, remat):
    from tests.reference import model_loss

    plain, scanned = (NemotronH(dataclasses.replace(c, remat=remat)) for c in (CFG, SCANNED))
    stacked = stack_layers(params, PATTERN)
    logits = [jax.jit(m.apply)({"params": p}, TOKENS) for m, p in ((scanned, stacked), (plain, params))]
    np.testing.assert_allclose(*logits, rtol=1e-5, atol=1e-5)
    want = jax.jit(jax.grad(lambda p: model_loss(plain, p, TOKENS)))(params)
    got = unstack_layers(jax.jit(jax.grad(lambda p: model_loss(scanned, p, TOKENS)))(stacked), PATTERN)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_train_step_with_scanned_layers_equals_the_unrolled_step(params):
    """Loss, updated parameters (AdamW and the MoE correction-bias update) and per-layer expert loads."""
    import ml_collections

    from configs import base
    from nemojax.train.metrics import expert_load_imbalance
    from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
    from nemojax.train.step import TrainState, train_step

    opt = ml_collections.ConfigDict(base.get_config().optimizer)
    optimizer, schedule = make_optimizer(opt, 10), learning_rate_schedule(opt, 10)
    batch = {"tokens": TOKENS, "mask": jnp.ones(TOKENS.shape, bool)}
    results = []
    for cfg, p in ((CFG, params), (SCANNED, stack_layers(params, PATTERN))):
        state = TrainState(jnp.ones((), jnp.int32), p, optimizer.init(p))
        step = jax.jit(lambda s, b, m=NemotronH(cfg): train_step(m, optimizer, s, b, 1, 1e-2, 1e-2, schedule))
        results.append(step(state, batch))
    (plain, plain_metrics), (scanned, scanned_metrics) = results
    assert abs(float(plain_metrics["loss"]) - float(scanned_metrics["loss"])) < 1e-5
    assert abs(float(plain_metrics["balance_loss"]) - float(scanned_metrics["balance_loss"])) < 1e-5
    assert expert_load_imbalance(plain_metrics["expert_counts"], PATTERN) == expert_load_imbalance(
        scanned_metrics["expert_counts"], PATTERN)
    assert list(expert_load_imbalance(scanned_metrics["expert_counts"], PATTERN)) == ["layers_1", "layers_5",
                                                                                       "layers_9"]
    got = unstack_layers(scanned.params, PATTERN)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    bias = got["layers_5"]["mixer"]["e_score_correction_bias"]
    assert not jnp.array_equal(bias, params["layers_5"]["mixer"]["e_score_correction_bias"])


def test_cached_generation_with_scanned_layers_equals_the_unrolled_model(params):
    from nemojax.generate import generate

    prompts = [[3, 5, 7, 9, 11], [4, 6]]
    plain = generate(CFG, params, prompts, max_new_tokens=6, temperature=0.0)
    scanned = generate(SCANNED, stack_layers(params, PATTERN), prompts, max_new_tokens=6, temperature=0.0)
    assert plain == scanned and any(plain)


def test_checkpoints_load_into_either_layout(tmp_path, params):
    from nemojax.checkpoint.conversion import orbax_to_hf
    from nemojax.checkpoint.hf import load_hf
    from nemojax.checkpoint.loading import abstract_params
    from nemojax.checkpoint.orbax_io import load_params
    from tests.reference import save_params

    save_params(str(tmp_path / "per_layer"), params, CFG)
    save_params(str(tmp_path / "stacked"), stack_layers(params, PATTERN), SCANNED)
    for source in ("per_layer", "stacked"):
        for cfg, want in ((CFG, params), (SCANNED, stack_layers(params, PATTERN))):
            got = load_params(str(tmp_path / source), abstract_params(cfg))
            assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want)), (source, cfg)

    # A scanned training checkpoint converts to the same Hub tensors as the per-layer one; load_hf
    # gives either layout.
    orbax_to_hf(str(tmp_path / "per_layer"), str(tmp_path / "hf_a"))
    orbax_to_hf(str(tmp_path / "stacked"), str(tmp_path / "hf_b"))
    from safetensors.numpy import load_file

    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf_a", "hf_b"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    _, loaded = load_hf(str(tmp_path / "hf_b"), scan_layers=True)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), loaded,
                                     stack_layers(params, PATTERN)))


def test_resume_in_the_other_layout_is_refused(tmp_path):
    from configs import base
    from nemojax.checkpoint.orbax_io import TrainCheckpoints
    from nemojax.sharding import make_mesh
    from nemojax.train.optimizer import make_optimizer
    from nemojax.train.trainer import abstract_train_state

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    optimizer = make_optimizer(base.get_config().optimizer, 10)
    abstract = {c.scan_layers: abstract_train_state(NemotronH(c), optimizer, mesh)[0] for c in (CFG, SCANNED)}
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract[True])
    checkpoints = TrainCheckpoints(str(tmp_path), keep=1)
    checkpoints.save(1, state, jax.random.key(0), {}, {}, SCANNED)
    checkpoints.wait()
    with pytest.raises(ConfigError, match=r"`scan_layers` = False: checkpoint .*1 was written with scan_layers=True"):
        checkpoints.restore(1, abstract[False])
    restored, _, _ = checkpoints.restore(1, abstract[True])
    assert int(restored.step) == 1 and os.path.isdir(tmp_path / "checkpoints" / "1")
    checkpoints.close()


def test_lowered_train_step_does_not_grow_with_depth():
    """Two and six repeats of a period lower to programs of nearly the same size when scanned; unrolled,
    the deeper one is about three times larger."""
    from nemojax.checkpoint.loading import abstract_params
    from tests.reference import model_loss

    def text_size(pattern: str, scan: bool) -> int:
        cfg = dataclasses.replace(CFG, hybrid_override_pattern=pattern, scan_layers=scan)
        model = NemotronH(cfg)
        grad = jax.jit(jax.grad(lambda p, t: model_loss(model, p, t)))
        return len(grad.lower(abstract_params(cfg), TOKENS).as_text())

    scanned = [text_size("ME*-" * k, True) for k in (2, 6)]
    unrolled = [text_size("ME*-" * k, False) for k in (2, 6)]
    assert scanned[1] < 1.05 * scanned[0], scanned
    assert unrolled[1] > 2.5 * unrolled[0], unrolled
