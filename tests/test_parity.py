"""nemojax vs transformers' nemotron_h, in float32: logits, loss and every parameter's gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nemojax
from nemojax.blocks import hf_table
from nemojax.checkpoint.hf import SafetensorsCheckpoint
from tests.reference import model_loss, next_token_loss


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def torch_loss_and_grads(model, ids: np.ndarray):
    """HF loss (labels = inputs) and each parameter's gradient under its Hub tensor name."""
    model.zero_grad()
    out = model(torch.as_tensor(ids, dtype=torch.long), labels=torch.as_tensor(ids, dtype=torch.long))
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        hub = "backbone." + name[len("model."):] if name.startswith("model.") else name
        g = p.grad.detach().double().numpy()
        if ".mixer.experts." in hub:  # stored stacked in memory, one tensor per expert on the Hub
            for e in range(g.shape[0]):
                grads[hub.replace(".experts.", f".experts.{e}.") + ".weight"] = g[e]
        else:
            grads[hub] = g
    if model.config.tie_word_embeddings:  # one weight in nemojax: its gradient is the sum of both uses
        grads["backbone.embeddings.weight"] = grads["backbone.embeddings.weight"] + grads.pop("lm_head.weight")
    return out.logits.detach().numpy(), out.loss.item(), grads


def jax_loss_and_grads(cfg, params, ids):
    """Logits, the loss from them, and the training loss (fused LM head) with its gradients."""
    model = nemojax.NemotronH(cfg)
    logits = model.apply({"params": params}, ids)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: model_loss(model, p, ids)))(params)
    assert abs(float(loss) - float(next_token_loss(logits, ids))) <= 1e-6 * float(loss)
    return np.asarray(logits), float(loss), grads


def get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.parametrize("kind", ["dense", "moe", "latent_moe", "biases", "tied"])
def test_logits_loss_and_gradients_match_transformers(kind, hf_checkpoints, token_batch):
    model, path = hf_checkpoints(kind)
    cfg, params = nemojax.load_hf(path)
    if kind == "tied":  # the installed transformers writes the tied head too; it loads as the embedding
        with SafetensorsCheckpoint(path) as ckpt:
            assert "lm_head.weight" in ckpt.names()
        assert "lm_head" not in params
    if kind == "biases":
        assert params["layers_0"]["mixer"]["in_dt_bias"].shape == (cfg.mamba_num_heads,)
        assert {"up_proj_bias", "down_proj_bias"} <= set(params["layers_1"]["mixer"])
    assert cfg.hybrid_override_pattern == model.config.hybrid_override_pattern
    ref_logits, ref_loss, ref_grads = torch_loss_and_grads(model, token_batch)
    logits, loss, grads = jax_loss_and_grads(cfg, params, jnp.asarray(token_batch))

    assert logits.shape == ref_logits.shape and logits.dtype == np.float32
    assert rel(logits, ref_logits) < 1e-5
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)

    checked = 0
    for entry in hf_table(cfg):
        names = [name for name, _ in entry.hf]
        if names[0].endswith("e_score_correction_bias"):  # a buffer: no gradient on either side
            assert not np.any(get(grads, entry.ours[0][0]))
            continue
        expected = entry.to_ours([ref_grads[name] for name in names])
        for (param_path, _), want in zip(entry.ours, expected):
            got = get(grads, param_path)
            assert got.shape == want.shape, param_path
            if np.linalg.norm(want) == 0:  # e.g. an expert no token was routed to
                assert np.linalg.norm(got) < 1e-12, param_path
            else:
                assert rel(got, want) < 1e-4, (param_path, rel(got, want))
            checked += 1
    assert checked == len(jax.tree.leaves(params)) - cfg.hybrid_override_pattern.count("E")


def test_a_tied_head_that_differs_from_the_embedding_is_named(hf_checkpoints, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    _, path = hf_checkpoints("tied")
    shutil.copytree(path, tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(nemojax.checkpoint.hf.CheckpointError,
                       match="tie_word_embeddings=true, but lm_head.weight .* differs from backbone.embeddings"):
        nemojax.load_hf(str(tmp_path / "ckpt"))


def test_sharded_checkpoint(hf_checkpoints, token_batch):
    model, path = hf_checkpoints("moe", "sharded")
    with SafetensorsCheckpoint(path) as ckpt:
        assert len(set(ckpt.file_of.values())) > 2, "the fixture should have produced several shards"
    cfg, params = nemojax.load_hf(path)
    ref = model(torch.as_tensor(token_batch, dtype=torch.long)).logits.detach().numpy()
    out = nemojax.NemotronH(cfg).apply({"params": params}, jnp.asarray(token_batch))
    assert rel(out, ref) < 1e-5


def test_bf16_checkpoint(hf_checkpoints, token_batch):
    model, path = hf_checkpoints("dense", "bf16")
    ids = torch.as_tensor(token_batch, dtype=torch.long)

    cfg, params = nemojax.load_hf(path)  # stays in the checkpoint's dtype
    assert cfg.param_dtype == "bfloat16"
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    out = nemojax.NemotronH(cfg).apply({"params": params}, jnp.asarray(token_batch))
    ref = model(ids).logits.detach().float().numpy()
    assert out.dtype == jnp.float32
    assert rel(out, ref) < 3e-2

    cfg32, params32 = nemojax.load_hf(path, param_dtype="float32")  # upcast: exact against an fp32 twin
    ref32 = model.float()(ids).logits.detach().numpy()
    model.to(torch.bfloat16)
    out32 = nemojax.NemotronH(cfg32).apply({"params": params32}, jnp.asarray(token_batch))
    assert rel(out32, ref32) < 1e-5
