"""Post-training quantization for serving (`nemojax-convert orbax-to-hf --quantize fp8|nvfp4`): which Hub
weights the selective recipe quantizes (`precision.SERVING_RECIPES`), and the calibration pass that measures
each quantized layer's input amax on a few batches (its static `input_scale`). The tensors themselves are
`modelopt.quantized_tensors`; the streaming writer is `conversion.orbax_to_hf`."""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from nemojax import precision
from nemojax.checkpoint.modelopt import NVFP4_GROUP, Quantization
from nemojax.config import ModelConfig

_EXPERT = re.compile(r"\.experts\.\d+\.")


def policy_module(hf_module: str) -> str:
    """A Hub module's name in the precision table (the experts' index dropped)."""
    return _EXPERT.sub(".experts.", hf_module)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """{Hub weight name: algorithm} to quantize, and the Quantization config the export declares."""

    weights: dict[str, str]
    quantization: Quantization
    kept_wide: tuple[str, ...]  # recipe-quantized modules whose input width NVFP4's blocks do not divide


def export_plan(cfg: ModelConfig, hf_weights: Iterable[tuple[str, tuple[int, ...]]], recipe: str) -> ExportPlan:
    """The weights `recipe` quantizes among the Hub tensors (name, shape); every other linear layer and the
    head are listed in `exclude_modules`."""
    table = precision.precision_table(cfg, precision.SERVING_RECIPES[recipe])
    algorithm = recipe.upper()
    weights, kept_wide = {}, []
    for name, shape in hf_weights:
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or table.get(policy_module(module)) != recipe:
            continue
        if algorithm == "NVFP4" and shape[1] % NVFP4_GROUP:
            kept_wide.append(module)
            continue
        weights[name] = algorithm
    quantized_modules = {policy_module(w.removesuffix(".weight")) for w in weights}
    # Every table module not quantized, the recipe's bf16 ones and the ones kept wide alike.
    excluded = ["lm_head"] + sorted({_pattern(m) for m in table if m not in quantized_modules})
    return ExportPlan(weights, Quantization("export", algorithm, tuple(excluded)), tuple(kept_wide))


def _pattern(module: str) -> str:
    """A precision-table module as exclude_modules writes it (all experts of a layer: `experts.*.up_proj`)."""
    return module.replace(".experts.", ".experts.*.")


def calibration_batches(cfg: ModelConfig, data: str, tokenizer: str, count: int, seq_len: int, batch: int = 4
                        ) -> list[np.ndarray]:
    """`count` batches of token windows: the synthetic language ("synthetic") or text files (globs, txt or
    jsonl with a `text` field) read with `tokenizer`."""
    import ml_collections

    from nemojax.data.pipeline import make_source
    from nemojax.data.synthetic import HELD_OUT_STREAM

    source_config = ml_collections.ConfigDict(dict(source="synthetic" if data == "synthetic" else "text",
                                                   paths=tuple(data.split(",")), tokenizer=tokenizer,
                                                   text_field="text", tokens_dtype="int32"))
    source = make_source(source_config, cfg, seq_len, HELD_OUT_STREAM)
    windows = [np.asarray(source[i % len(source)]["tokens"]) for i in range(count * batch)]
    return [np.stack(windows[i * batch:(i + 1) * batch]) for i in range(count)]


def hf_module_of(path: tuple[str, ...]) -> str:
    """A sown calibration value's path (`layers_3/mixer/shared_experts/up_proj`) -> the Hub module name."""
    layer, rest = path[0], path[1:]
    prefix = f"backbone.layers.{layer.removeprefix('layers_')}" if layer.startswith("layers_") else layer
    return ".".join((prefix, *rest))


def input_amax(cfg: ModelConfig, params, batches: list[np.ndarray]) -> dict[str, float]:
    """{Hub module (the experts' index dropped): the largest |input| over the batches} for every linear
    layer of the backbone (per-layer parameter layout)."""
    from nemojax.model import NemotronH

    model = NemotronH(dataclasses.replace(cfg, scan_layers=False))

    @jax.jit
    def sown(params, tokens):
        _, state = model.apply({"params": params}, tokens, method="hidden", mutable=[precision.CALIBRATION])
        return state[precision.CALIBRATION]

    amax: dict[str, float] = {}
    for i, tokens in enumerate(batches):
        for path, value in flax.traverse_util.flatten_dict(sown(params, jnp.asarray(tokens))).items():
            module = hf_module_of(path)
            amax[module] = max(amax.get(module, 0.0), float(np.max(value)))
        print(f"nemojax-convert: calibration batch {i + 1}/{len(batches)}", file=sys.stderr)
    return amax
