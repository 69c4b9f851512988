"""Reading Hugging Face Hub checkpoints (config.json + safetensors) with the safetensors numpy API."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import jax.numpy as jnp
import ml_dtypes  # also registers bfloat16 with numpy, which the safetensors numpy API needs
import numpy as np
from safetensors import safe_open

from nemojax.blocks import hf_table
from nemojax.checkpoint import modelopt
from nemojax.config import ModelConfig
from nemojax.hf_names import UNSUPPORTED_PREFIXES, Entry
from nemojax.scan_layers import to_layout

FLOAT8 = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint does not match what its config describes."""


def error_summary(e: BaseException) -> str:
    """"Type: first line of the message", for one-line reports of what Orbax / tensorstore raised."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _open(file: str):
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # safetensors reports truncation and bad headers as its own error types
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


class SafetensorsCheckpoint(contextlib.AbstractContextManager):
    """The tensors of one Hub checkpoint directory (single file or index + shards), opened lazily.

    A ModelOpt-quantized checkpoint (FP8 / NVFP4, `modelopt.py`) reads as its dense tensors: each quantized
    weight dequantized to fp32 under its own name, the scale tensors out of view; `problems` lists what is
    missing or mis-shaped among them (`check_tensors` reports it with the rest)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            weight_map = {name: SINGLE_FILE for name in _open(os.path.join(path, SINGLE_FILE)).keys()}
        else:
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")
        self.stored_file_of = weight_map
        self._handles: dict[str, Any] = {}
        try:
            self.quantization = modelopt.read_quantization(path)
        except (modelopt.QuantizationError, ValueError) as e:
            raise CheckpointError(str(e)) from None
        self.quantized, hidden, self.problems = modelopt.find_quantized(
            list(weight_map), self.stored_shape, self.stored_dtype, self.quantization)
        self.file_of = {name: file for name, file in weight_map.items() if name not in hidden}

    def _handle(self, name: str):
        file = self.stored_file_of[name]
        if file not in self._handles:
            full = os.path.join(self.path, file)
            if not os.path.exists(full):
                raise CheckpointError(f"{full}: shard listed in {INDEX_FILE} (for tensor {name}) does not exist")
            self._handles[file] = _open(full)
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.file_of)

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype code, e.g. "BF16"."""
        return self._handle(name).get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.quantized[name].dense_shape if name in self.quantized else self.stored_shape(name)

    def dtype(self, name: str) -> str:
        """The safetensors dtype code, e.g. "BF16" ("F32" for a dequantized weight)."""
        return "F32" if name in self.quantized else self.stored_dtype(name)

    def nbytes(self, name: str) -> int:
        """Bytes stored (what reading the tensor costs)."""
        sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}
        itemsize = sizes.get(self.stored_dtype(name), 1)
        return int(np.prod(self.stored_shape(name), dtype=np.int64)) * itemsize

    def read_stored(self, name: str) -> np.ndarray:
        try:
            if self.stored_dtype(name) in FLOAT8:  # numpy has no float8: the safetensors numpy API refuses them
                return self._read_float8(name)
            return self._handle(name).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, self.stored_file_of[name])}: cannot read tensor "
                                  f"{name} ({e})") from None

    def read(self, name: str) -> np.ndarray:
        if name in self.quantized:
            return self.quantized[name].dequantize(self.read_stored)
        return self.read_stored(name)

    def _read_float8(self, name: str) -> np.ndarray:
        """A float8 tensor's bytes, from the safetensors header's offsets, as an ml_dtypes array."""
        file = os.path.join(self.path, self.stored_file_of[name])
        with open(file, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(header_bytes))[name]
        begin, end = entry["data_offsets"]
        data = np.fromfile(file, np.uint8, count=end - begin, offset=8 + header_bytes + begin)
        return data.view(FLOAT8[entry["dtype"]]).reshape(entry["shape"])

    def release(self) -> None:
        """Close the open files (and their memory maps), so the pages read so far can leave memory."""
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.release()


def read_config(path: str, **overrides: Any) -> ModelConfig:
    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise CheckpointError(f"{config_file}: not found (is {path} a Hugging Face checkpoint directory?)")
    try:
        with open(config_file, encoding="utf-8") as f:
            hf = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(hf).__name__}")
    return config_from_json(hf, **overrides)


def config_from_json(hf: dict, **runtime: Any) -> ModelConfig:
    """A stored config.json dict (a Hub checkpoint's, or an Orbax checkpoint's `model` item) as a ModelConfig
    whose parameters keep the stored dtype unless `param_dtype=` says otherwise (compute: the same)."""
    runtime.setdefault("param_dtype", hf.get("dtype") or hf.get("torch_dtype") or "float32")
    runtime.setdefault("dtype", runtime["param_dtype"])
    return ModelConfig.from_hf(hf, **runtime)


TIED_HEAD, EMBEDDINGS = "lm_head.weight", "backbone.embeddings.weight"


def check_tensors(ckpt: SafetensorsCheckpoint, table: list[Entry], tied: bool = False) -> None:
    """One error listing every missing, unexpected, unsupported or mis-shaped tensor. With tied embeddings
    an `lm_head.weight` equal to the embeddings is accepted (transformers writes the tied head too)."""
    expected = {name: shape for entry in table for name, shape in entry.hf}
    found = set(ckpt.names())
    if tied and TIED_HEAD in found:
        found.discard(TIED_HEAD)
        if EMBEDDINGS in found and not np.array_equal(ckpt.read(TIED_HEAD), ckpt.read(EMBEDDINGS)):
            raise CheckpointError(f"{ckpt.path}: config.json says tie_word_embeddings=true, but {TIED_HEAD} "
                                  f"[{ckpt.file_of[TIED_HEAD]}] differs from {EMBEDDINGS}: set "
                                  "tie_word_embeddings=false to load a separate head")
    problems = list(ckpt.problems)  # quantized weights' scales (modelopt.py)
    for name in sorted(expected.keys() - found):
        problems.append(f"  missing:     {name} (expected shape {expected[name]})")
    for name in sorted(found - expected.keys()):
        reason = next((why for prefix, why in UNSUPPORTED_PREFIXES.items() if name.startswith(prefix)), None)
        if reason:
            problems.append(f"  unsupported: {name} [{ckpt.file_of[name]}]: {reason}")
        else:
            problems.append(f"  unexpected:  {name} [{ckpt.file_of[name]}] shape {ckpt.shape(name)}")
    for name in sorted(expected.keys() & found):
        if ckpt.shape(name) != expected[name]:
            problems.append(f"  mis-shaped:  {name} [{ckpt.file_of[name]}]: expected {expected[name]}, "
                            f"found {ckpt.shape(name)}")
    if problems:
        raise CheckpointError(f"{ckpt.path}: checkpoint does not match its config.json "
                              f"({len(problems)} problems):\n" + "\n".join(problems))


def iter_params(ckpt: SafetensorsCheckpoint, table: list[Entry]) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(parameter path, numpy value) for every nemojax parameter, one table entry at a time."""
    for entry in table:
        values = entry.to_ours([ckpt.read(name) for name, _ in entry.hf])
        for (path, _), value in zip(entry.ours, values):
            yield path, value


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf(path: str, **config_overrides: Any) -> tuple[ModelConfig, dict]:
    """Read a Hub checkpoint directory into (ModelConfig, params) for `NemotronH(cfg).apply`.

    Parameters are stored in the checkpoint's dtype unless `param_dtype=` says otherwise; the
    e_score_correction_bias buffers stay float32 as in transformers. With `scan_layers=True` the tree
    comes in the scanned layout (nemojax/scan_layers.py).
    """
    cfg = read_config(path, **config_overrides)
    table = hf_table(cfg)
    params: dict = {}
    with SafetensorsCheckpoint(path) as ckpt:
        check_tensors(ckpt, table, cfg.tie_word_embeddings)
        for param_path, value in iter_params(ckpt, table):
            dtype = jnp.float32 if param_path[-1] == "e_score_correction_bias" else jnp.dtype(cfg.param_dtype)
            set_path(params, param_path, jnp.asarray(value, dtype=dtype))
    return cfg, to_layout(params, cfg.hybrid_override_pattern, cfg.scan_layers)
