"""Low-precision training as a policy over the linear layers (docs/models.md, "Low precision").

`ModelConfig.precision` names a recipe; a recipe is a default format and an ordered table of rules (the
first rule that matches a linear layer decides its format). A format says how each of a linear layer's
three GEMMs quantizes its two inputs (`LinearFormat`); `nemojax/ops/quantized_matmul.py` runs them.

    bf16   nothing quantized
    fp8    Nemotron-H: per-tensor current scaling, E4M3 forward, E5M2 gradients; the first and last 2
           layers (and MTP) in bf16
    nvfp4  Nemotron 3 Super: NVFP4 (weights 16x16 blocks, activations 1x16, gradients 1x16 with stochastic
           rounding, a random Hadamard transform on the weight-gradient GEMM's inputs); the last 15% of
           layers, attention projections, latent projections and MTP in bf16; Mamba out_proj in MXFP8
    mxfp8  MXFP8 (E4M3, 32-element blocks) everywhere

Only the blocks' linear layers take part (`BlockKind.linears`, named as Hugging Face names the modules under
`mixer`): embeddings, the LM head, the router, the MTP module's eh_proj, convolutions, norms and the SSD
scan always run in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from nemojax.config import PRECISION_RECIPES
from nemojax.quant import E4M3, E5M2, MXFP8_BLOCK, NVFP4_BLOCK

# ----- formats -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Operand:
    """How one GEMM input is quantized along the GEMM's contraction axis."""

    scheme: str  # fp8 (one scale per tensor) | mxfp8 (a power-of-two scale per 32) | nvfp4 (nemojax.quant)
    dtype: Any = E4M3  # fp8 / mxfp8 element type
    block: tuple[int, int] = (1, NVFP4_BLOCK)  # nvfp4: (1, 16), or (16, 16) for weights
    stochastic: bool = False  # stochastic rounding (gradients), else round to nearest


@dataclasses.dataclass(frozen=True)
class LinearFormat:
    """A linear layer y = x W's three GEMMs: forward x W, data gradient dy W^T, weight gradient x^T dy."""

    name: str
    x: Operand  # forward: the input, along features
    w: Operand  # forward and data gradient: the weight, along its contracted axis
    dy: Operand  # data gradient: the output gradient, along output features
    x_t: Operand  # weight gradient: the input, along tokens
    dy_t: Operand  # weight gradient: the output gradient, along tokens
    hadamard: bool = False  # the 16x16 random Hadamard transform on both weight-gradient inputs (tokens)

    @property
    def needs_key(self) -> bool:
        """Whether the backward pass draws random numbers (stochastic rounding, Hadamard signs)."""
        return self.hadamard or any(op.stochastic for op in (self.dy, self.dy_t))

    @property
    def token_block(self) -> int:
        """Rows of a weight-gradient quantization block along tokens (1: per-tensor scaling)."""
        return {"fp8": 1, "mxfp8": MXFP8_BLOCK, "nvfp4": NVFP4_BLOCK}[self.x_t.scheme]


def _uniform(name: str, forward: Operand, gradient: Operand) -> LinearFormat:
    return LinearFormat(name, forward, forward, gradient, forward, gradient)


_NVFP4_ACT, _NVFP4_GRAD = Operand("nvfp4"), Operand("nvfp4", stochastic=True)
FORMATS: dict[str, LinearFormat | None] = {
    "bf16": None,  # the compute dtype, unquantized
    "fp8": _uniform("fp8", Operand("fp8", E4M3), Operand("fp8", E5M2)),
    "mxfp8": _uniform("mxfp8", Operand("mxfp8", E4M3), Operand("mxfp8", E4M3)),
    "nvfp4": LinearFormat("nvfp4", x=_NVFP4_ACT, w=Operand("nvfp4", block=(NVFP4_BLOCK, NVFP4_BLOCK)),
                          dy=_NVFP4_GRAD, x_t=_NVFP4_ACT, dy_t=_NVFP4_GRAD, hadamard=True),
}


# ----- recipes ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """Linear layers that get `format`. Unset fields match everything; a layer-position rule (first / last /
    last_fraction) matches backbone layers in any of its ranges; `mtp` rules match only the MTP module."""

    format: str
    projections: tuple[str, ...] = ()  # module names under `mixer` ("in_proj", "experts.up_proj", ...)
    kinds: str = ""  # block pattern characters
    beside: str = ""  # only blocks next to a block of one of these kinds
    first: int = 0  # the first `first` backbone layers
    last: int = 0  # the last `last` backbone layers
    last_fraction: float = 0.0  # the last ceil(fraction x layers) backbone layers
    mtp: bool = False

    def matches(self, layer: int | None, pattern: str, kind: str, projection: str) -> bool:
        """`layer`: a backbone index into `pattern`, or None for an MTP block."""
        if self.mtp != (layer is None):
            return False
        if (self.kinds and kind not in self.kinds) or (self.projections and projection not in self.projections):
            return False
        if layer is None:
            return not self.beside
        if self.beside and not any(0 <= j < len(pattern) and pattern[j] in self.beside for j in (layer - 1, layer + 1)):
            return False
        if not (self.first or self.last or self.last_fraction):
            return True
        tail = max(self.last, math.ceil(self.last_fraction * len(pattern)))
        return layer < self.first or layer >= len(pattern) - tail


@dataclasses.dataclass(frozen=True)
class Recipe:
    default: str
    rules: tuple[Rule, ...] = ()


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
RECIPES: dict[str, Recipe] = {
    "bf16": Recipe("bf16"),
    "fp8": Recipe("fp8", (Rule("bf16", first=2, last=2), Rule("bf16", mtp=True))),
    "nvfp4": Recipe("nvfp4", (
        Rule("bf16", last_fraction=0.15),
        Rule("bf16", mtp=True),
        Rule("bf16", projections=ATTENTION),
        Rule("bf16", projections=("fc1_latent_proj", "fc2_latent_proj")),
        Rule("mxfp8", kinds="M", projections=("out_proj",)),
    )),
    "mxfp8": Recipe("mxfp8"),
}
assert tuple(RECIPES) == PRECISION_RECIPES
assert all(r.default in FORMATS and all(rule.format in FORMATS for rule in r.rules) for r in RECIPES.values())

# Post-training quantization for serving (`nemojax-convert orbax-to-hf --quantize`), ModelOpt's selective
# recipe for the Nemotron releases: weights only in the format (FP8 per tensor, NVFP4 1x16 along inputs) with
# calibrated static input scales; attention, the Mamba layers next to it and MTP stay in the compute dtype.
KEEP_NEAR_ATTENTION = (Rule("bf16", kinds="*"), Rule("bf16", kinds="M", beside="*"), Rule("bf16", mtp=True))
SERVING_RECIPES: dict[str, Recipe] = {"fp8": Recipe("fp8", KEEP_NEAR_ATTENTION),
                                      "nvfp4": Recipe("nvfp4", KEEP_NEAR_ATTENTION)}


def format_name(recipe: Recipe, layer: int | None, pattern: str, kind: str, projection: str) -> str:
    """The format of one linear layer (`layer` None: in the MTP module) under `recipe`."""
    return next((rule.format for rule in recipe.rules if rule.matches(layer, pattern, kind, projection)),
                recipe.default)


LayerFormats = tuple[tuple[str, tuple[str, ...]], ...]  # (projection, format per repeat of a scanned run)


def layer_formats(cfg, layers: tuple[int | None, ...], kind: str) -> LayerFormats:
    """One block's formats: for each linear layer of a `kind` block, its format at each of `layers` (the
    repeats of a scanned block; one entry otherwise; None: an MTP block)."""
    from nemojax.blocks import KINDS

    recipe = RECIPES[cfg.precision]
    return tuple((projection, tuple(format_name(recipe, layer, cfg.hybrid_override_pattern, kind, projection)
                                    for layer in layers))
                 for projection in KINDS[kind].linears(cfg))


def precision_table(cfg, recipe: Recipe | None = None) -> dict[str, str]:
    """{"backbone.layers.3.mixer.in_proj": "fp8", "mtp.layers.0.mixer.q_proj": "bf16", ...}: every
    quantizable linear layer (its Hugging Face module name) and its format under `recipe` (default: the
    training recipe `cfg.precision`)."""
    from nemojax.blocks import KINDS

    recipe = recipe or RECIPES[cfg.precision]
    blocks = [(f"backbone.layers.{i}", i, kind) for i, kind in enumerate(cfg.hybrid_override_pattern)]
    blocks += [(f"mtp.layers.{j}", None, kind) for j, kind in
               enumerate(cfg.mtp_hybrid_override_pattern if cfg.num_nextn_predict_layers else "")]
    return {f"{prefix}.mixer.{projection}": format_name(recipe, layer, cfg.hybrid_override_pattern, kind, projection)
            for prefix, layer, kind in blocks for projection in KINDS[kind].linears(cfg)}


# ----- random numbers and calibration ---------------------------------------------------------------------

CALIBRATION = "calibration"  # the variable collection a calibration pass sows each linear layer's input amax in
RNG_STREAM = "quant"  # the Flax rng stream the backward pass's stochastic rounding draws from
BATCH_KEY = "quant_key"  # a microbatch's key for it (`nemojax.train.step.train_step`)


def rngs(batch: dict) -> dict:
    """The `rngs=` of a training apply: the microbatch's key for the low-precision backward pass."""
    return {RNG_STREAM: batch[BATCH_KEY]} if BATCH_KEY in batch else {}


# ----- what a traced model used --------------------------------------------------------------------------

_traced: list | None = None


class traced_formats:
    """`with traced_formats() as seen:` records, while a model is traced inside the block, every linear
    layer's (module path, projection, format per repeat): what the built model really runs, for tests and
    reports."""

    def __enter__(self) -> list[tuple[tuple[str, ...], str, tuple[str, ...]]]:
        global _traced
        _traced = []
        return _traced

    def __exit__(self, *exc) -> None:
        global _traced
        _traced = None


def note_traced(module, projection: str, names: tuple[str, ...]) -> None:
    if _traced is not None:
        _traced.append((tuple(module.path), projection, names))
