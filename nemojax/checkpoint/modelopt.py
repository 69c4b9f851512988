"""NVIDIA ModelOpt's quantized Hugging Face layout (the FP8 and NVFP4 releases), both directions.

A quantized linear layer `M` stores, beside each other (docs/models.md, "Low precision"):

    FP8    M.weight F8_E4M3 [out, in]       M.weight_scale F32 []          M.input_scale F32 []
    NVFP4  M.weight U8 [out, in / 2]        M.weight_scale F8_E4M3 [out, in / 16]
           (two E2M1 codes per byte,        M.weight_scale_2 F32 []        M.input_scale F32 []
            the even element in the low nibble)

dense weight = FP8: weight x weight_scale; NVFP4: E2M1(code) x weight_scale (per 16 inputs) x weight_scale_2.
input_scale is the calibrated static activation scale (amax / 448; NVFP4: amax / (6 x 448)) a server uses;
loading does not need it. `hf_quant_config.json` (or config.json's `quantization_config`) names the algorithm
(`quant_algo`: FP8, NVFP4, or MIXED_PRECISION with a per-module `quantized_layers` table) and the modules
left unquantized (`exclude_modules`, fnmatch patterns). Attention `k_scale` / `v_scale` (an FP8 KV cache) are
read past: nemojax keeps the KV cache in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os

import ml_dtypes
import numpy as np

QUANT_CONFIG_FILE = "hf_quant_config.json"
ALGORITHMS = ("FP8", "NVFP4")
NVFP4_GROUP = 16
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
# E2M1 by code: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1_BY_CODE = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
SCALES = (".weight_scale", ".weight_scale_2", ".input_scale")
KV_CACHE_SCALES = (".k_scale", ".v_scale")


class QuantizationError(ValueError):
    """A quantization config that cannot be read."""


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Which modules a checkpoint quantizes, and how (from `source`)."""

    source: str
    algorithm: str  # FP8 | NVFP4 | MIXED_PRECISION
    exclude: tuple[str, ...] = ()
    layers: tuple[tuple[str, str], ...] = ()  # MIXED_PRECISION: (module, algorithm)

    def algorithm_of(self, module: str) -> str | None:
        if self.algorithm == "MIXED_PRECISION":
            return dict(self.layers).get(module)
        return None if any(fnmatch.fnmatchcase(module, p) for p in self.exclude) else self.algorithm

    def to_json(self) -> dict:
        """The `quantization` section of hf_quant_config.json (config.json's quantization_config adds
        quant_method)."""
        out = {"quant_algo": self.algorithm, "kv_cache_quant_algo": None, "exclude_modules": list(self.exclude)}
        if self.algorithm == "NVFP4":
            out["group_size"] = NVFP4_GROUP
        return out


def read_quantization(path: str) -> Quantization | None:
    """The checkpoint's ModelOpt quantization config, or None for an unquantized checkpoint."""
    file = os.path.join(path, QUANT_CONFIG_FILE)
    if os.path.exists(file):
        with open(file, encoding="utf-8") as f:
            try:
                section = json.load(f).get("quantization")
            except (ValueError, AttributeError) as e:
                raise QuantizationError(f"{file}: not a JSON object with a `quantization` section ({e})") from None
    else:
        file = os.path.join(path, "config.json")
        if not os.path.exists(file):
            return None
        with open(file, encoding="utf-8") as f:
            section = json.load(f).get("quantization_config")
        if section is None:
            return None
        if section.get("quant_method") != "modelopt":
            raise QuantizationError(f"{file}: quantization_config.quant_method = {section.get('quant_method')!r}; "
                                    "nemojax reads ModelOpt checkpoints (quant_method 'modelopt')")
    if not isinstance(section, dict):
        raise QuantizationError(f"{file}: expected a `quantization` object, found {section!r}")
    algorithm = str(section.get("quant_algo", "")).upper()
    layers = {}
    if algorithm == "MIXED_PRECISION":
        layers = {m: str(v.get("quant_algo", "")).upper() for m, v in section.get("quantized_layers", {}).items()}
    for module, algo in [("", algorithm)] * (algorithm != "MIXED_PRECISION") + list(layers.items()):
        if algo not in ALGORITHMS:
            raise QuantizationError(f"{file}: quant_algo {algo!r}{' for ' + module if module else ''}: nemojax "
                                    f"reads {', '.join(ALGORITHMS)} and MIXED_PRECISION of them")
    exclude = section.get("exclude_modules", section.get("ignore")) or ()
    return Quantization(file, algorithm, tuple(exclude), tuple(sorted(layers.items())))


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """One stored quantized weight and the tensors its dense value needs."""

    algorithm: str
    name: str  # M.weight
    dense_shape: tuple[int, ...]

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    def dequantize(self, read) -> np.ndarray:
        """The dense fp32 weight; `read(name)` gives a stored tensor."""
        weight, scale = read(self.name), read(self.module + ".weight_scale").astype(np.float32)
        if self.algorithm == "FP8":
            return weight.astype(np.float32) * scale.reshape(())
        codes = np.stack([weight & 0xF, weight >> 4], axis=-1).reshape(weight.shape[0], -1)
        per_element = np.repeat(scale, NVFP4_GROUP, axis=-1)
        return E2M1_BY_CODE[codes] * per_element * read(self.module + ".weight_scale_2").astype(np.float32)


def stored_algorithm(dtype: str) -> str | None:
    """What a stored weight dtype says it is: F8_E4M3 -> FP8, U8 (packed E2M1) -> NVFP4."""
    return {"F8_E4M3": "FP8", "U8": "NVFP4"}.get(dtype)


def _expected_scales(algorithm: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[tuple[int, ...], ...], str]]:
    """{suffix: (accepted shapes, dtype)} of the tensors a stored quantized weight needs."""
    if algorithm == "FP8":
        return {".weight_scale": (((), (1,)), "F32")}
    *rows, packed = shape
    return {".weight_scale": (((*rows, 2 * packed // NVFP4_GROUP),), "F8_E4M3"),
            ".weight_scale_2": (((), (1,)), "F32")}


def find_quantized(names: list[str], shape, dtype, quantization: Quantization | None
                   ) -> tuple[dict[str, QuantizedWeight], set[str], list[str]]:
    """From a checkpoint's stored tensors: ({M.weight: QuantizedWeight}, the scale tensors they use (hidden
    from the dense view), every problem as a line of the one error list)."""
    present = set(names)
    quantized, used, problems = {}, set(), []
    for name in sorted(present):
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        algorithm = stored_algorithm(dtype(name))
        if algorithm is None:
            continue
        declared = quantization.algorithm_of(module) if quantization else None
        if quantization is None:
            problems.append(f"  quantized:   {name} is stored as {dtype(name)} but the checkpoint has no "
                            f"{QUANT_CONFIG_FILE} or quantization_config")
            continue
        if declared != algorithm:
            problems.append(f"  quantized:   {name} is stored as {algorithm} ({dtype(name)}), {quantization.source} "
                            f"says {declared or 'unquantized (exclude_modules)'}")
            continue
        for suffix, (shapes, want) in _expected_scales(algorithm, shape(name)).items():
            scale = module + suffix
            if scale not in present:
                problems.append(f"  missing:     {scale} (the {algorithm} scale of {name}, expected shape "
                                f"{shapes[0]} {want})")
            elif shape(scale) not in shapes or dtype(scale) != want:
                problems.append(f"  mis-shaped:  {scale}: expected {shapes[0]} {want}, found {shape(scale)} "
                                f"{dtype(scale)}")
        if module + ".input_scale" in present and shape(module + ".input_scale") not in ((), (1,)):
            problems.append(f"  mis-shaped:  {module}.input_scale: expected a scalar, found "
                            f"{shape(module + '.input_scale')}")
        used.update(module + s for s in SCALES if module + s in present)
        *rows, cols = shape(name)  # the dense shape (NVFP4: two values per byte), checked against the config
        quantized[name] = QuantizedWeight(algorithm, name, (*rows, cols * (2 if algorithm == "NVFP4" else 1)))
    orphans = {n for n in present if n.endswith(SCALES) and n not in used}
    for n in sorted(orphans):
        weight = n.rsplit(".", 1)[0] + ".weight"
        stored_as = f" ({weight} is stored as {dtype(weight)})" if weight in present else ""
        problems.append(f"  unexpected:  {n}: a scale without a quantized weight{stored_as}")
    hidden = used | orphans | {n for n in present if n.endswith(KV_CACHE_SCALES)}
    return quantized, hidden, problems


# ----- writing ---------------------------------------------------------------------------------------------


def pack_e2m1(values: np.ndarray) -> np.ndarray:
    """[out, in] E2M1 values -> [out, in / 2] bytes, the even element in the low nibble."""
    codes = np.asarray(values).view(np.uint8) & 0xF
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def quantized_layout(module: str, algorithm: str, shape: tuple[int, int], input_scale: bool
                     ) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} of the tensors `quantized_tensors` writes for a dense [out, in] weight."""
    out, cols = shape
    f32 = np.dtype(np.float32)
    if algorithm == "FP8":
        layout = {".weight": (E4M3, (out, cols)), ".weight_scale": (f32, ())}
    else:
        layout = {".weight": (np.dtype(np.uint8), (out, cols // 2)),
                  ".weight_scale": (E4M3, (out, cols // NVFP4_GROUP)), ".weight_scale_2": (f32, ())}
    if input_scale:
        layout[".input_scale"] = (f32, ())
    return {module + suffix: value for suffix, value in layout.items()}


def quantized_tensors(module: str, algorithm: str, weight: np.ndarray, input_amax: float | None
                      ) -> dict[str, np.ndarray]:
    """The stored tensors of one quantized linear layer from its dense [out, in] weight (`nemojax.quant`'s
    quantizers: FP8 per tensor, NVFP4 in 1 x 16 blocks along inputs), with the static input scale from the
    calibrated activation amax (None: not written)."""
    import jax.numpy as jnp

    from nemojax import quant

    x = jnp.asarray(weight, jnp.float32)
    if algorithm == "FP8":
        q = quant.fp8(x, quant.E4M3)
        out = {".weight": np.asarray(q.values), ".weight_scale": np.asarray(q.scales, np.float32).reshape(())}
        top = quant.largest(quant.E4M3)
    else:
        q = quant.nvfp4(x, (1, NVFP4_GROUP))
        out = {".weight": pack_e2m1(np.asarray(q.values)), ".weight_scale": np.asarray(q.scales),
               ".weight_scale_2": np.asarray(q.tensor_scale, np.float32).reshape(())}
        top = quant.largest(quant.E2M1) * quant.largest(quant.E4M3)
    if input_amax is not None:
        out[".input_scale"] = np.asarray(max(input_amax, 1e-12) / top, np.float32).reshape(())
    return {module + suffix: value for suffix, value in out.items()}
