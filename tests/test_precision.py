"""Low-precision recipes (`nemojax/precision.py`) and the quantized GEMMs (`nemojax/ops/quantized_matmul.py`):
which format each linear layer of a Super-shaped and an 8B-shaped model runs in, each GEMM of a quantized
linear layer against a reference written here, scanned runs, and the FP8 GEMMs lowered for CUDA."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import nemotron_3_super_120b_a12b, nemotron_h_8b
from nemojax import precision, quant
from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.ops.quantized_matmul import native_fp8_dot, quantized_grouped_matmul, quantized_matmul
from nemojax.scan_layers import layer_runs, stack_layers, unstack_layers
from tests.conftest import BASE, MOE
from tests.test_quant import E4M3, E5M2, ref_fp8, ref_mxfp8, ref_nvfp4, sample

SUPER_PATTERN = nemotron_3_super_120b_a12b.get_config().model.hybrid_override_pattern  # 88 layers
H8B_PATTERN = nemotron_h_8b.get_config().model.hybrid_override_pattern  # 52 layers
SUPER_SHAPED = dict(BASE, **dict(MOE, n_group=1), moe_latent_size=18, hybrid_override_pattern=SUPER_PATTERN,
                    num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def built_table(cfg: ModelConfig) -> dict[str, str]:
    """{Hub module name: format} of every linear layer, as the built model traces them."""
    with precision.traced_formats() as seen:
        jax.eval_shape(lambda: NemotronH(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    runs = {run.key: run for run in layer_runs(cfg.hybrid_override_pattern, cfg.scan_layers)}
    table = {}
    for path, projection, names in seen:
        below = ".".join((*path[path.index("mixer") + 1:], projection))
        if path[0] == "mtp":
            table[f"mtp.layers.{path[1].removeprefix('layers_')}.mixer.{below}"] = names[0]
            continue
        run = runs[path[0]]
        block = int(path[1].removeprefix("block_")) if run.scanned else 0
        for repeat, name in enumerate(names):
            table[f"backbone.layers.{run.layer(repeat, block)}.mixer.{below}"] = name
    return table


def expected_super_nvfp4(name: str) -> str:
    """docs/models.md, "Low precision": the last ~15% of layers (ceil: 14 of 88, layers 74-87), MTP,
    attention projections and latent projections in bf16; Mamba out_proj in MXFP8; the rest NVFP4."""
    if name.startswith("mtp.") or int(name.split(".")[2]) >= 74:
        return "bf16"
    if name.rsplit(".", 1)[1] in (*ATTENTION, "fc1_latent_proj", "fc2_latent_proj"):
        return "bf16"
    if name.endswith("out_proj") and SUPER_PATTERN[int(name.split(".")[2])] == "M":
        return "mxfp8"
    return "nvfp4"


def expected_8b_fp8(name: str) -> str:
    """Nemotron-H: the first and last 2 layers (0, 1, 50, 51) in bf16, every other linear layer FP8."""
    return "bf16" if int(name.split(".")[2]) in (0, 1, 50, 51) else "fp8"


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
@pytest.mark.parametrize("shape, recipe, expected, counts", [
    # layers 0-73 hold 34 Mamba, 33 MoE and 7 attention blocks; 74-87: 6 Mamba, 7 MoE, 1 attention; MTP "*E"
    (SUPER_SHAPED, "nvfp4", expected_super_nvfp4, {"nvfp4": 34 + 4 * 33, "mxfp8": 34,
                                                   "bf16": 4 * 7 + 2 * 33 + (2 * 6 + 6 * 7 + 4) + (4 + 6)}),
    # 26 Mamba and 22 MLP blocks of 2 linear layers, 4 attention blocks of 4; layers 0, 1, 50, 51: M - M -
    (dict(BASE, hybrid_override_pattern=H8B_PATTERN), "fp8", expected_8b_fp8, {"fp8": 112 - 8, "bf16": 8}),
], ids=["super_nvfp4", "8b_fp8"])
def test_recipe_table(shape, recipe, expected, counts, scan):
    """Every linear layer of the built model is in the format the recipe's table gives, and
    `precision_table` reports exactly what the model runs."""
    cfg = ModelConfig(**shape, precision=recipe, scan_layers=scan)
    built = built_table(cfg)
    assert built == precision.precision_table(cfg)
    assert built == {name: expected(name) for name in built}
    assert {f: list(built.values()).count(f) for f in set(built.values())} == counts
    # Spot checks, by hand: a Mamba, an MoE (LatentMoE + shared expert) and an attention layer.
    if recipe == "nvfp4":
        assert [built[f"backbone.layers.0.mixer.{p}"] for p in ("in_proj", "out_proj")] == ["nvfp4", "mxfp8"]
        assert [built[f"backbone.layers.1.mixer.{p}"] for p in (
            "experts.up_proj", "experts.down_proj", "fc1_latent_proj", "shared_experts.down_proj")] == [
            "nvfp4", "nvfp4", "bf16", "nvfp4"]
        assert built["backbone.layers.73.mixer.in_proj"] == "nvfp4"
        assert built["backbone.layers.74.mixer.experts.up_proj"] == "bf16"
        assert built["mtp.layers.1.mixer.experts.up_proj"] == "bf16"


def test_bf16_recipe_quantizes_nothing():
    cfg = ModelConfig(**SUPER_SHAPED, precision="bf16")
    assert set(built_table(cfg).values()) == {"bf16"}


# ----- the GEMMs of one quantized linear layer ------------------------------------------------------------

X, W, DY = sample((37, 40), 1), sample((40, 24), 2), sample((37, 24), 3)  # tokens not a multiple of 16


def _gemms(fmt, key):
    y, vjp = jax.vjp(lambda x, w: quantized_matmul(x, w, fmt, key), jnp.asarray(X), jnp.asarray(W))
    return (np.asarray(t) for t in (y, *vjp(jnp.asarray(DY))))


def test_fp8_linear_layer():
    """Forward E4M3 x E4M3; data gradient E5M2 x E4M3; weight gradient E4M3 x E5M2; per-tensor scales."""
    y, dx, dw = _gemms(precision.FORMATS["fp8"], None)
    x, w, dy = ref_fp8(X, E4M3), ref_fp8(W, E4M3), ref_fp8(DY, E5M2)
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, x.T @ dy, rtol=1e-5, atol=1e-4)
    # What CUDA runs instead: the float8 values' product in fp32, times the two scales.
    fmt = precision.FORMATS["fp8"]
    native = native_fp8_dot(jnp.asarray(DY), jnp.asarray(W).T, fmt.dy, fmt.w, None, None)
    np.testing.assert_allclose(native, dy @ w.T, rtol=1e-5, atol=1e-4)


def test_mxfp8_linear_layer():
    """Every input in blocks of 32 along the contracted axis (zero-padded): the weight along its inputs
    for the forward, along its outputs for the data gradient; activations and gradients along tokens for
    the weight gradient."""
    y, dx, dw = _gemms(precision.FORMATS["mxfp8"], None)
    np.testing.assert_allclose(y, ref_mxfp8(X) @ ref_mxfp8(W.T).T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, ref_mxfp8(DY) @ ref_mxfp8(W).T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, ref_mxfp8(X.T) @ ref_mxfp8(DY.T).T, rtol=1e-5, atol=1e-4)


def _pad_rows(t, multiple):
    return np.pad(t, [(0, -t.shape[0] % multiple), (0, 0)])


def test_nvfp4_linear_layer():
    """Forward 1x16 activations x 16x16 weights (round to nearest); data gradient: 1x16 gradients with
    stochastic rounding x the same weights; weight gradient: both inputs through the 16x16 random Hadamard
    transform over tokens, then 1x16 along tokens (the gradient rounded stochastically). The key splits
    into (data gradient, weight gradient, Hadamard signs)."""
    key = jax.random.key(7)
    y, dx, dw = _gemms(precision.FORMATS["nvfp4"], key)
    dgrad_key, wgrad_key, hadamard_key = jax.random.split(key, 3)
    x = ref_nvfp4(np.pad(X, [(0, 0), (0, 8)]), (1, 16))[:, :40]
    w = ref_nvfp4(np.pad(W, [(0, 0), (0, 8)]), (16, 16))[:, :24]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-4)
    dy = np.asarray(quant.nvfp4(jnp.pad(jnp.asarray(DY), [(0, 0), (0, 8)]), key=dgrad_key).dequantize())[:, :24]
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-5, atol=1e-4)
    h = np.asarray(quant.hadamard(hadamard_key))

    def mix(t):  # the transform over tokens, 16 at a time
        return np.einsum("ij,bjn->bin", h, _pad_rows(t, 16).reshape(-1, 16, t.shape[1])).reshape(-1, t.shape[1])

    x_t = ref_nvfp4(np.pad(mix(X).T, [(0, 8), (0, 0)]), (1, 16))[:40]  # [features, tokens]
    dy_t = np.asarray(quant.nvfp4(jnp.asarray(mix(DY).T), key=wgrad_key).dequantize())  # 24 rows: no padding
    np.testing.assert_allclose(dw, x_t @ dy_t.T, rtol=1e-5, atol=1e-4)
    # Stochastic rounding is keyed: another key, another data gradient; the forward does not change.
    y2, dx2, _ = _gemms(precision.FORMATS["nvfp4"], jax.random.key(8))
    np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(dx, dx2)


def test_nvfp4_backward_without_a_key_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rngs=\{'quant': key\}"):
        _gemms(precision.FORMATS["nvfp4"], None)


def test_grouped_gemms_keep_each_expert_apart():
    """The experts' grouped GEMM in FP8 equals each expert's own quantized matmul's products, with one
    activation / gradient scale over all rows and one weight scale per expert; under NVFP4 each expert's
    tokens are padded to whole 16-row blocks before the Hadamard transform, so the weight gradient of an
    expert only sees its own tokens (the unquantized limit: exact)."""
    x, dy = jnp.asarray(sample((23, 40), 4)), jnp.asarray(sample((23, 24), 5))
    w = jnp.asarray(np.stack([sample((40, 24), 6 + e) for e in range(3)]))
    sizes = jnp.asarray([9, 0, 14], jnp.int32)
    fp8 = precision.FORMATS["fp8"]
    y, vjp = jax.vjp(lambda x, w: quantized_grouped_matmul(x, w, sizes, fp8), x, w)
    dx, dw = vjp(dy)
    xq, dyq = ref_fp8(np.asarray(x), E4M3), ref_fp8(np.asarray(dy), E5M2)
    rows = [slice(0, 9), slice(9, 9), slice(9, 23)]
    for e, r in enumerate(rows):
        we = ref_fp8(np.asarray(w[e]), E4M3)
        np.testing.assert_allclose(y[r], xq[r] @ we, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dx[r], dyq[r] @ we.T, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dw[e], xq[r].T @ dyq[r], rtol=1e-5, atol=1e-4)
    # The Hadamard transform alone (float32 "quantizers"): each expert's weight gradient is still its own.
    exact = precision.LinearFormat("hadamard_only", *(precision.Operand("fp8", jnp.float32),) * 5, hadamard=True)
    _, vjp = jax.vjp(lambda w: quantized_grouped_matmul(x, w, sizes, exact, jax.random.key(0)), w)
    (dw,) = vjp(dy)
    for e, r in enumerate(rows):
        np.testing.assert_allclose(dw[e], np.asarray(x[r]).T @ np.asarray(dy[r]), rtol=1e-4, atol=1e-3)


# ----- in a model -----------------------------------------------------------------------------------------


def test_scanned_runs_pick_each_repeats_format():
    """A scanned run whose repeats differ in format (fp8 keeps the first and last 2 layers in bf16: the run
    `-*` x 3 is bf16, fp8, bf16) gives the per-layer model's loss and gradients."""
    shape = dict(BASE, hybrid_override_pattern="-*-*-*")
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, BASE["vocab_size"])
    params = nn.unbox(NemotronH(ModelConfig(**shape)).init(jax.random.key(0), tokens)["params"])

    def loss_and_grads(recipe, scan):
        cfg = ModelConfig(**shape, precision=recipe, scan_layers=scan)
        assert len(layer_runs(cfg.hybrid_override_pattern, scan)) == (1 if scan else 6)
        loss = lambda p: jnp.mean(NemotronH(cfg).apply({"params": p}, tokens) ** 2)  # noqa: E731
        value, grads = jax.value_and_grad(loss)(stack_layers(params, cfg.hybrid_override_pattern) if scan else params)
        return value, unstack_layers(grads, cfg.hybrid_override_pattern)

    (v0, g0), (v1, g1) = loss_and_grads("fp8", False), loss_and_grads("fp8", True)  # layers 2, 3 in FP8
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)
    bf16 = jnp.mean(NemotronH(ModelConfig(**shape)).apply({"params": params}, tokens) ** 2)
    assert abs(float(bf16) - float(v0)) > 1e-6 * abs(float(v0))  # fp8 did change it


@pytest.mark.parametrize("platform, float8_dots", [
    ("cuda", 6 * 3),  # MEM*E under fp8: only layer 2 (Mamba: in_proj's 5 parts, out_proj) is FP8; 3 GEMMs each
    ("tpu", 0),  # simulated: quantize-dequantize, then fp32 dots
    ("cpu", 0),
])
def test_fp8_gemms_lower_to_float8_dots_on_cuda(platform, float8_dots):
    from tests.test_pallas import lowered_train_step

    text = lowered_train_step(platform, "xla", "xla", precision="fp8")
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    float8 = [line for line in dots if "f8E4M3FN" in line or "f8E5M2" in line]
    assert len(float8) == float8_dots, float8
    assert all(re.search(r"-> tensor<[0-9x]*xf32>", line) for line in float8)  # fp32 accumulation and result
    assert sum("f8E5M2" in line for line in float8) == 2 * float8_dots // 3  # gradients in both backward GEMMs


# ----- training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_run():
    """Steps of the train step on the synthetic language under a recipe (one compilation per recipe; the
    seed is an argument): the losses."""
    from configs import base
    from nemojax.data.synthetic import synthetic_example
    from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
    from nemojax.train.step import TrainState, train_step

    shape = dict(BASE, **dict(MOE, n_group=1), vocab_size=256, hybrid_override_pattern="M-ME-*M-")
    opt = base.get_config().optimizer
    opt.update(dict(learning_rate=3e-3, warmup_steps=5))
    total = 30
    optimizer, schedule = make_optimizer(opt, total), learning_rate_schedule(opt, total)
    compiled = {}

    def run(recipe: str, steps: int, seed: int = 0) -> list[float]:
        model = NemotronH(ModelConfig(**shape, precision=recipe))
        params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
        if recipe not in compiled:
            compiled[recipe] = jax.jit(lambda state, batch, seed: train_step(
                model, optimizer, state, batch, 1, 1e-4, 1e-3, schedule, seed=seed))
        losses = []
        for i in range(steps):
            examples = [synthetic_example(7, 4 * i + j, 40) for j in range(4)]
            batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in ("tokens", "mask")}
            state, metrics = compiled[recipe](state, batch, seed)
            losses.append(float(metrics["loss"]))
        return losses

    return run


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_training_under_a_recipe_lowers_the_loss(training_run, recipe):
    """The loss falls under each recipe (the tiny model's 600-step comparison is benchmarks/precision.py);
    the backward pass's random numbers come from the seed and the step: the same seed repeats a run
    exactly, another seed changes NVFP4's stochastic rounding."""
    losses = training_run(recipe, 30)
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    if recipe == "nvfp4":
        assert training_run(recipe, 3) == losses[:3] and training_run(recipe, 3, seed=1)[1:3] != losses[1:3]
