"""MTP layers: the forward against the spec, the loss, Super-shaped checkpoints, speculative decoding."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nemojax import ModelConfig, NemotronH, generate
from nemojax.blocks import hf_table
from nemojax.checkpoint.hf import CheckpointError, SafetensorsCheckpoint, load_hf
from nemojax.train.step import TrainState, loss_and_stats, mtp_target_counts, train_step
from tests import background
from tests.conftest import BASE, MOE

EPS = BASE["layer_norm_epsilon"]
PROMPTS = [list(range(3, 8)), list(range(20, 31)), [9, 4], list(range(40, 57))]  # 5, 11, 2, 17 tokens


def perturbed_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3):
    """Random parameters moved away from their init values (norm scales off 1, biases off 0)."""
    params = nn.unbox(NemotronH(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * (jnp.std(x) + 0.05) * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def mtp_config(depths: int = 1, **fields) -> ModelConfig:
    return ModelConfig(**{**BASE, "hybrid_override_pattern": "M-M*-", "num_nextn_predict_layers": depths,
                          "mtp_hybrid_override_pattern": "*-", "eos_token_id": None, **fields})


# ----- the forward, from the spec in docs/models.md --------------------------------------------------
def rms(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def attention(x, p, cfg):
    """GQA causal self-attention of one sequence [l, d], no positional embedding."""
    q = np.einsum("ld,dhk->lhk", x, p["q_proj"])
    k = np.repeat(np.einsum("ld,dhk->lhk", x, p["k_proj"]), cfg.num_attention_heads // cfg.num_key_value_heads, 1)
    v = np.repeat(np.einsum("ld,dhk->lhk", x, p["v_proj"]), cfg.num_attention_heads // cfg.num_key_value_heads, 1)
    scores = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(cfg.head_dim)
    scores = np.where(np.tril(np.ones(scores.shape[1:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("qhk,hkd->qd", np.einsum("hqs,shk->qhk", weights, v), p["o_proj"])


def mtp_by_spec(params, cfg, backbone_hidden, tokens):
    """Each depth's logits for one sequence, from the spec: shift, embed, enorm / hnorm, eh_proj of
    [embedding, hidden], an attention block and an MLP block (pre-norm residual), final norm, shared head."""
    m = jax.tree.map(np.asarray, params["mtp"])
    embed, head = np.asarray(params["embed"]), np.asarray(params["lm_head"])
    h, length, out = backbone_hidden, len(tokens), []
    for depth in range(1, cfg.num_nextn_predict_layers + 1):
        n = length - depth  # positions whose next-but-depth token exists
        e = embed[tokens[depth:]]
        x = np.concatenate([rms(e, m["enorm"]["scale"]), rms(h[:n], m["hnorm"]["scale"])], -1) @ m["eh_proj"]
        x = x + attention(rms(x, m["layers_0"]["norm"]["scale"]), m["layers_0"]["mixer"], cfg)
        mlp = m["layers_1"]["mixer"]
        x = x + np.maximum(rms(x, m["layers_1"]["norm"]["scale"]) @ mlp["up_proj"], 0) ** 2 @ mlp["down_proj"]
        h = rms(x, m["final_layernorm"]["scale"])
        out.append(h @ head)
    return out


@pytest.mark.parametrize("depths", [1, 2])
def test_mtp_forward_equals_the_spec(depths, token_batch):
    cfg = mtp_config(depths)
    params = perturbed_params(cfg)
    model = NemotronH(cfg)
    @jax.jit
    def forward(params, tokens):
        hidden = model.apply({"params": params}, tokens, method="hidden")
        outputs = model.apply({"params": params}, hidden, tokens, method="mtp_depths")
        return hidden, [model.apply({"params": params}, out, method="logits") for out in outputs]

    hidden, logits = forward(params, token_batch)
    assert len(logits) == depths
    for row in range(token_batch.shape[0]):
        expected = mtp_by_spec(params, cfg, np.asarray(hidden[row]), token_batch[row])
        for depth, (got, want) in enumerate(zip(logits, expected), start=1):
            np.testing.assert_allclose(got[row, :len(want)], want, rtol=2e-4, atol=2e-4, err_msg=f"depth {depth}")


def test_a_config_without_mtp_builds_todays_parameter_tree():
    with_mtp, without = perturbed_params(mtp_config(1)), perturbed_params(mtp_config(0))
    assert "mtp" not in without
    assert set(with_mtp) == set(without) | {"mtp"}
    assert {"enorm", "hnorm", "eh_proj", "layers_0", "layers_1", "final_layernorm"} == set(with_mtp["mtp"])


# ----- the loss ----------------------------------------------------------------------------------
def _train_inputs(token_batch):
    mask = np.ones(token_batch.shape, bool)
    mask[0, 9] = False  # a document starts at row 0, position 9
    mask[:, 0] = False
    return jnp.asarray(token_batch), jnp.asarray(mask)


def test_mtp_loss_is_each_depths_mean_over_its_own_valid_targets(token_batch):
    """Depth d at t predicts tokens[t + d + 1] where no document starts in t+1 .. t+d+1; the objective
    adds weight / depths x the depths' losses."""
    cfg = mtp_config(2)
    params, model = perturbed_params(cfg), NemotronH(cfg)
    tokens, mask = _train_inputs(token_batch)
    count = jnp.sum(mask[:, 1:])
    objective, (lm, _, _, mtp) = loss_and_stats(model, params, tokens, mask, count, 0.0, 0.5,
                                                mtp_target_counts(model, tokens, mask))
    hidden = model.apply({"params": params}, tokens, method="hidden")
    outputs = model.apply({"params": params}, hidden, tokens, method="mtp_depths")
    toks, m = np.asarray(tokens), np.asarray(mask)
    for depth, out in enumerate(outputs, start=1):
        logits = np.asarray(model.apply({"params": params}, out, method="logits"), np.float64)
        nll = []
        for b in range(toks.shape[0]):
            for t in range(toks.shape[1] - depth - 1):
                if m[b, t + 1:t + depth + 2].all():
                    row = logits[b, t]
                    nll.append(np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[toks[b, t + depth + 1]])
        assert len(nll) < (toks.shape[1] - depth - 1) * toks.shape[0]  # the document start removed some
        np.testing.assert_allclose(mtp[depth - 1], np.mean(nll), rtol=1e-5)
    np.testing.assert_allclose(objective, lm + 0.5 / 2 * (mtp[0] + mtp[1]), rtol=1e-6)


def test_mtp_gradients_reach_the_mtp_and_the_shared_embedding_and_head(token_batch):
    cfg = mtp_config(1)
    params, model = perturbed_params(cfg), NemotronH(cfg)
    tokens, mask = _train_inputs(token_batch)
    counts = mtp_target_counts(model, tokens, mask)

    def grads(weight):
        return jax.jit(jax.grad(lambda p: loss_and_stats(model, p, tokens, mask, jnp.sum(mask[:, 1:]), 0.0, weight,
                                                         counts)[0]))(params)

    with_mtp, without = grads(0.3), grads(0.0)
    for path, g in jax.tree_util.tree_leaves_with_path(with_mtp["mtp"]):
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
    assert all(np.abs(np.asarray(g)).max() == 0 for g in jax.tree.leaves(without["mtp"]))
    for shared in ("embed", "lm_head"):
        assert np.abs(np.asarray(with_mtp[shared] - without[shared])).max() > 1e-6, shared


def test_weight_zero_is_todays_step(token_batch):
    """A model with MTP layers trained with loss weight 0 steps exactly like the same backbone without them."""
    tokens, mask = _train_inputs(token_batch)
    optimizer = optax.adamw(1e-3)
    schedule = optax.constant_schedule(1e-3)
    results = []
    for depths in (1, 0):
        cfg = mtp_config(depths)
        params = perturbed_params(mtp_config(1))
        if not depths:
            params = {k: v for k, v in params.items() if k != "mtp"}
        state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
        state, metrics = jax.jit(lambda s, b, m=NemotronH(cfg): train_step(m, optimizer, s, b, 1, 0.0, 0.0, schedule,
                                                                           mtp_loss_weight=0.0)
                                 )(state, {"tokens": tokens, "mask": mask})
        assert "mtp_loss" not in metrics
        results.append((metrics["loss"], {k: v for k, v in state.params.items() if k != "mtp"}))
    (loss_a, params_a), (loss_b, params_b) = results
    np.testing.assert_array_equal(loss_a, loss_b)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ----- Super-shaped checkpoints --------------------------------------------------------------------
SUPER_SHAPED = dict(num_nextn_predict_layers=1, mtp_layers_block_type=["attention", "moe"])


@pytest.fixture(scope="module")
def super_checkpoint(tmp_path_factory):
    """A transformers-written LatentMoE checkpoint (transformers builds no MTP module) with random,
    perturbed mtp.* tensors added with safetensors, as a released Super has them."""
    from safetensors.numpy import save_file

    from tests.conftest import build_hf_model

    model = build_hf_model("latent_moe", **SUPER_SHAPED)
    path = str(tmp_path_factory.mktemp("super_shaped"))
    model.save_pretrained(path)
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["num_nextn_predict_layers"] == 1
    cfg = ModelConfig.from_hf(config)
    with SafetensorsCheckpoint(path) as ckpt:
        tensors = {name: ckpt.read(name) for name in ckpt.names()}
    assert not any(name.startswith("mtp.") for name in tensors)
    rng = np.random.default_rng(0)
    for entry in hf_table(cfg):
        for name, shape in entry.hf:
            if name.startswith("mtp."):
                base = 1.0 if name.endswith("norm.weight") else 0.0
                tensors[name] = (base + 0.3 * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return model, path


def test_super_shaped_checkpoint_loads_and_the_backbone_matches_transformers(super_checkpoint, token_batch):
    import torch

    model, path = super_checkpoint
    cfg, params = load_hf(path)
    assert cfg.num_nextn_predict_layers == 1 and cfg.mtp_hybrid_override_pattern == "*E"
    assert {"fc1_latent_proj", "experts_up", "shared_experts"} <= set(params["mtp"]["layers_1"]["mixer"])
    with torch.no_grad():
        want = model(torch.as_tensor(token_batch, dtype=torch.long)).logits.numpy()
    got = NemotronH(cfg).apply({"params": params}, token_batch)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    hidden = NemotronH(cfg).apply({"params": params}, token_batch, method="hidden")
    out = NemotronH(cfg).apply({"params": params}, hidden, token_batch, method="mtp_depths")[0]
    assert np.isfinite(np.asarray(out)).all()


def test_super_shaped_checkpoint_round_trips_bit_identically(super_checkpoint, tmp_path):
    from nemojax.convert import main

    _, src = super_checkpoint
    assert main(["hf-to-orbax", src, str(tmp_path / "orbax")]) == 0
    assert main(["orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    with SafetensorsCheckpoint(src) as a, SafetensorsCheckpoint(str(tmp_path / "hf")) as b:
        assert sorted(a.names()) == sorted(b.names())
        assert sum(name.startswith("mtp.") for name in a.names()) > 10
        for name in a.names():
            np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
            assert a.dtype(name) == b.dtype(name), name
    written = json.load(open(tmp_path / "hf" / "config.json"))
    assert written["num_nextn_predict_layers"] == 1 and written["mtp_layers_block_type"] == ["full_attention", "moe"]


def test_partial_mtp_tensors_get_one_error_list(super_checkpoint, tmp_path):
    import shutil

    from safetensors.numpy import save_file

    _, src = super_checkpoint
    dst = tmp_path / "partial"
    shutil.copytree(src, dst)
    with SafetensorsCheckpoint(src) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.names() if n not in ("mtp.layers.0.eh_proj.weight",
                                                                       "mtp.layers.1.final_layernorm.weight")}
    tensors["mtp.layers.0.hnorm.weight"] = tensors["mtp.layers.0.hnorm.weight"][:-1]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        load_hf(str(dst))
    message = str(error.value)
    assert "(3 problems)" in message
    for name in ("missing:     mtp.layers.0.eh_proj.weight", "missing:     mtp.layers.1.final_layernorm.weight",
                 "mis-shaped:  mtp.layers.0.hnorm.weight"):
        assert name in message


def test_mtp_tensors_without_num_nextn_predict_layers_are_named(super_checkpoint, tmp_path):
    import shutil

    _, src = super_checkpoint
    dst = tmp_path / "no_mtp_config"
    shutil.copytree(src, dst)
    config = json.load(open(dst / "config.json"))
    config["num_nextn_predict_layers"] = 0
    json.dump(config, open(dst / "config.json", "w"))
    with pytest.raises(CheckpointError, match="mtp.layers.0.eh_proj.weight .*num_nextn_predict_layers = 0"):
        load_hf(str(dst))


# ----- speculative decoding ------------------------------------------------------------------------
RANDOM_MTP_MODELS = {
    "dense": {"hybrid_override_pattern": "M-M*-", "mtp_hybrid_override_pattern": "*-"},
    "moe": {**MOE, "hybrid_override_pattern": "MEM*E", "mtp_hybrid_override_pattern": "*E"},
    # A scanned run of three `M*` periods (caches stacked over layers), and Mamba inside the MTP module.
    "scanned": {"hybrid_override_pattern": "M*M*M*-", "mtp_hybrid_override_pattern": "M*-", "scan_layers": True},
}


@pytest.fixture(scope="module")
def random_mtp_models():
    cache = {}

    def get(kind):
        if kind not in cache:
            cfg = mtp_config(1, **RANDOM_MTP_MODELS[kind])
            cache[kind] = cfg, perturbed_params(cfg)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind, k", [("dense", 1), ("dense", 3), ("dense", 5), ("moe", 3), ("scanned", 3)])
def test_greedy_speculation_returns_plain_greedy_tokens(random_mtp_models, kind, k):
    """(The MoE model at k = 1 and 5: the trained `*E` model's tests below.)"""
    cfg, params = random_mtp_models(kind)
    plain = generate(cfg, params, PROMPTS, 12)
    speculated, stats = generate(cfg, params, PROMPTS, 12, speculative_tokens=k, return_stats=True)
    assert speculated == plain
    assert len(stats.accepted) == k + 1 and stats.accepted[0] > 0  # random drafts: rejected at the first


def start_tiny_mtp_run() -> background.Job:
    """configs/tiny_mtp.py trained briefly by train.py (conftest.py starts it at collection)."""
    from tests.test_train import REPO, subprocess_env, train_command

    workdir = os.path.join(background.workspace("tiny_mtp_run"), "run")
    return background.launch("tiny_mtp_run", train_command(
        workdir, "--config.total_steps=150", "--config.eval_every=0", "--config.checkpoint_every=150",
        config=os.path.join(REPO, "configs", "tiny_mtp.py")), subprocess_env(compilation_cache=False), workdir=workdir)


@pytest.fixture(scope="module")
def trained_mtp():
    """The tiny MTP model (its metrics name every MTP depth)."""
    from nemojax.checkpoint.loading import load_model

    job = background.job("tiny_mtp_run", start_tiny_mtp_run)
    assert job.wait() == 0, job.output(tail=3000)
    workdir = job.attrs["workdir"]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    cfg, params, _ = load_model(workdir)
    return cfg, params, records


@pytest.mark.slow
def test_tiny_mtp_trains_its_mtp_layer(trained_mtp):
    _, _, records = trained_mtp
    depth = [r["mtp_loss_depth_1"] for r in records if "mtp_loss_depth_1" in r]
    assert len(depth) >= 3 and depth[-1] < 0.6 * depth[0]


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 5])
def test_trained_mtp_speculation_is_exact_and_accepts(trained_mtp, k):
    """Rows of different lengths; rounds that reject at the first draft and rounds that accept all k."""
    cfg, params, _ = trained_mtp
    prompts = [list(b"a=1 b=2 c=3 | b="), list(b"12+30="), list(b"q=5 x=8 y=1 z=0 w=4 | x=8 z"), list(b"7")]
    plain = generate(cfg, params, prompts, 60, stop_tokens=())  # through several documents
    speculated, stats = generate(cfg, params, prompts, 60, speculative_tokens=k, return_stats=True, stop_tokens=())
    assert speculated == plain
    assert stats.accepted[0] > 0 and stats.accepted[k] > 0
    assert stats.mean_accepted_length > 1.5
    stopped = generate(cfg, params, prompts, 60, speculative_tokens=k)  # at the end of each document
    assert stopped == generate(cfg, params, prompts, 60)


# ----- sampled speculation is lossless -------------------------------------------------------------
def _wilson_hilferty(chi2: float, dof: int) -> float:
    """The z-score of a chi-square statistic (normal approximation of its cube root)."""
    return ((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / np.sqrt(2 / (9 * dof))


def _chi2_z(samples: list[list[int]], probs: dict[tuple[int, ...], float]) -> float:
    counts: dict[tuple[int, ...], int] = {}
    for s in samples:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    n = len(samples)
    big = [c for c, p in probs.items() if p * n >= 5]
    rest_expected = n * (1 - sum(probs[c] for c in big))
    rest_seen = n - sum(counts.get(c, 0) for c in big)
    chi2 = sum((counts.get(c, 0) - n * probs[c]) ** 2 / (n * probs[c]) for c in big)
    chi2 += (rest_seen - rest_expected) ** 2 / max(rest_expected, 1e-9)
    return _wilson_hilferty(chi2, len(big))


def test_sampled_speculation_draws_from_the_models_distribution(monkeypatch):
    """On a 5-token vocabulary, 3-token continuations sampled with speculation (k = 2, random drafts that
    disagree with the model) follow the model's exact distribution; a wrong acceptance rule does not."""
    import itertools

    import nemojax.speculative as speculative

    cfg = mtp_config(1, vocab_size=5)
    params = perturbed_params(cfg, seed=3, scale=1.0)
    prompt, n, options = [1, 3, 2, 4], 6000, dict(temperature=1.0, top_k=4)
    model = NemotronH(cfg)
    continuations = [list(c) for c in itertools.product(range(5), repeat=3)]
    ids = np.array([prompt + c for c in continuations], np.int32)
    logits = np.asarray(model.apply({"params": params}, ids), np.float64)[:, len(prompt) - 1:-1]
    kth = np.sort(logits, -1)[..., -4:-3]
    logits = np.where(logits < kth, -np.inf, logits)
    logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    probs = {tuple(c): float(np.exp(sum(logp[i, j, c[j]] for j in range(3)))) for i, c in enumerate(continuations)}
    probs = {c: p for c, p in probs.items() if p > 0}

    plain = generate(cfg, params, [prompt] * n, 3, seed=1, **options)
    speculated, stats = generate(cfg, params, [prompt] * n, 3, seed=2, speculative_tokens=2, return_stats=True,
                                 **options)
    assert stats.accepted[0] > 0.05 * stats.rounds and stats.accepted[0] < 0.95 * stats.rounds
    z_plain, z_speculated = _chi2_z(plain, probs), _chi2_z(speculated, probs)
    assert z_plain < 4 and z_speculated < 4, (z_plain, z_speculated)

    def accept_ignoring_q(drafts, draft_logits, target_logits, key, sampling):
        """A wrong rule: accept a draft with probability p(d), else sample the model's p."""
        p = speculative._distributions(target_logits, sampling)
        p_draft = jnp.take_along_axis(p[:, :drafts.shape[1]], drafts[..., None], axis=-1)[..., 0]
        accept_key, bonus_key = jax.random.split(key)
        agree = jax.random.uniform(accept_key, drafts.shape) < p_draft
        n = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)
        return n, jax.random.categorical(bonus_key, jnp.log(p[jnp.arange(n.shape[0]), n]), axis=-1)

    monkeypatch.setattr(speculative, "_accept", accept_ignoring_q)
    jax.clear_caches()
    wrong = generate(cfg, params, [prompt] * n, 3, seed=2, speculative_tokens=2, **options)
    z_wrong = _chi2_z(wrong, probs)
    assert z_wrong > 6, z_wrong
    print(f"chi-square z: plain {z_plain:.2f}, speculative {z_speculated:.2f}, rule ignoring q {z_wrong:.2f}")


def test_speculation_needs_mtp_layers_and_a_valid_k():
    """Refused before any parameter is read."""
    from nemojax.generate import GenerationError

    with pytest.raises(GenerationError, match="num_nextn_predict_layers = 0"):
        generate(mtp_config(0), None, PROMPTS, 4, speculative_tokens=2)
    with pytest.raises(GenerationError, match="speculative_tokens = -1"):
        generate(mtp_config(1), None, PROMPTS, 4, speculative_tokens=-1)
