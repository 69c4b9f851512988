"""Conversion between the Hugging Face Hub layout and nemojax's Orbax layout, streaming (the command line
is `nemojax/convert.py`).

Both directions walk the name table (`blocks.hf_table`, the one `load_hf` uses) one layer at a
time: tensors are read from memory-mapped safetensors (or restored from Orbax) for that layer only and
written out before the next is read, so host memory holds about one layer. Output is built in a
temporary sibling directory that is renamed to DST only on success; nothing is left behind on error.
Only safetensors are read, never pickles.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.v1 import partial as partial_save
from tqdm import tqdm

from nemojax import precision
from nemojax.blocks import hf_table
from nemojax.checkpoint import modelopt, ptq
from nemojax.checkpoint.hf import (
    EMBEDDINGS,
    TIED_HEAD,
    CheckpointError,
    SafetensorsCheckpoint,
    check_tensors,
    error_summary,
    read_config,
    set_path,
)
from nemojax.checkpoint.loading import checkpoint_format
from nemojax.checkpoint.orbax_io import latest_checkpoint, read_model_config, restore_params_to_host, stored_params_tree
from nemojax.checkpoint.writing import SAFETENSORS_DTYPES, StreamingShards, staged_output
from nemojax.config import ConfigError
from nemojax.hf_names import Entry
from nemojax.scan_layers import is_stacked, unstack_layers

# Files that travel with the weights (tokenizer, chat template, generation defaults).
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja", "tokenizer.model")
_ALWAYS_FP32 = ("e_score_correction_bias",)  # a buffer transformers keeps in float32
_SAVE_BYTES = 64 * 2**20  # layers are written in batches of at least this many bytes


def layer_groups(table: list[Entry]) -> list[list[Entry]]:
    """Entries grouped by their top-level parameter (`embed`, `layers_i`, `norm_f`, `lm_head`)."""
    groups: dict[str, list[Entry]] = {}
    for entry in table:
        groups.setdefault(entry.ours[0][0][0], []).append(entry)
    return list(groups.values())


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS (glibc keeps it per thread arena otherwise:
    with tensorstore's threads that grew the converter's footprint by a few layers under load)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


def _entry_bytes(entry: Entry, itemsize: int) -> int:
    return sum(int(np.prod(shape)) for _, shape in entry.hf) * itemsize


def _copy_assets(src: str, dst: str) -> None:
    for name in ASSET_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


# ----- HF -> Orbax ---------------------------------------------------------------------------------
def check_dtypes(ckpt: SafetensorsCheckpoint, table: list[Entry]) -> None:
    for entry in table:
        for name, _ in entry.hf:
            dtype = ckpt.dtype(name)
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{os.path.join(ckpt.path, ckpt.file_of[name])}: tensor {name} has dtype "
                                      f"{dtype}; supported: {', '.join(SAFETENSORS_DTYPES)}")


def hf_to_orbax(src: str, dst: str, dtype: str | None = None, force: bool = False) -> None:
    overrides = {"param_dtype": dtype} if dtype else {}
    cfg = read_config(src, **overrides)
    table = hf_table(cfg)
    target = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
    with staged_output(dst, force) as out, SafetensorsCheckpoint(src) as ckpt:
        check_tensors(ckpt, table, cfg.tie_word_embeddings)
        check_dtypes(ckpt, table)
        staging = os.path.join(out, "staging")
        total = sum(_entry_bytes(e, SAFETENSORS_DTYPES[ckpt.dtype(e.hf[0][0])].itemsize) for e in table)
        tree, tree_bytes = {}, 0
        done, n_tensors = 0, sum(len(entry.hf) for entry in table)
        with tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-orbax", file=sys.stderr) as bar:
            groups = layer_groups(table)
            for i, group in enumerate(groups):
                for entry in group:
                    values = entry.to_ours([ckpt.read(name) for name, _ in entry.hf])
                    for (path, _), value in zip(entry.ours, values):
                        cast = np.float32 if path[-1] in _ALWAYS_FP32 else target
                        value = np.array(value, dtype=cast, order="C")  # cast and lay out in one pass
                        set_path(tree, path, value)
                        tree_bytes += value.nbytes
                    bar.update(sum(ckpt.nbytes(name) for name, _ in entry.hf))
                done += sum(len(entry.hf) for entry in group)
                bar.set_postfix(tensors=f"{done}/{n_tensors}", refresh=False)
                ckpt.release()  # unmap what was read
                if tree_bytes >= _SAVE_BYTES or i == len(groups) - 1:
                    # Partial saves merge into the staged checkpoint; each costs metadata work that grows
                    # with the leaves saved so far, so layers go in batches of about _SAVE_BYTES.
                    partial_save.save(staging, tree)
                    tree, tree_bytes = {}, 0
                    release_freed_memory()
        partial_save.finalize(staging)
        os.rename(os.path.join(staging, "state"), os.path.join(out, "params"))
        shutil.rmtree(staging)
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
            checkpointer.save(os.path.join(out, "model"), args=ocp.args.JsonSave(cfg.to_hf()))
        os.makedirs(os.path.join(out, "assets"))
        _copy_assets(src, os.path.join(out, "assets"))


# ----- Orbax -> HF ---------------------------------------------------------------------------------
def _restore_group(src: str, group: list[Entry]) -> dict:
    item: dict = {}
    for entry in group:
        for path, shape in entry.ours:
            set_path(item, path, ocp.RestoreArgs(restore_type=np.ndarray))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(src, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            item=item, restore_args=item, partial_restore=True)))
    return restored["params"]


def _stored_dtypes(tree: dict) -> dict[str, np.dtype]:
    """{"layers_0/mixer/in_z": dtype, ...} from a tree of array metadata or arrays."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + (key,))
            else:
                flat["/".join(prefix + (key,))] = np.dtype(value.dtype)
    walk(tree, ())
    return flat


def _unreadable_is_an_error(src: str, what: str, read, *args):
    """read(*args), with any failure of Orbax / tensorstore on a damaged checkpoint as one CheckpointError."""
    try:
        return read(*args)
    except (CheckpointError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - truncated or missing files surface as many different errors
        raise CheckpointError(f"{src}: cannot read its {what} ({error_summary(e)})") from None


def _get_path(tree: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return tree


@dataclasses.dataclass(frozen=True)
class Quantize:
    """`orbax_to_hf`'s post-training quantization (`ptq.py`): the serving recipe, and the calibration data
    (synthetic, or text globs read with `tokenizer`; 0 batches: no input scales)."""

    recipe: str  # fp8 | nvfp4
    data: str = "synthetic"
    tokenizer: str = ""
    batches: int = 8
    seq_len: int = 512


def orbax_to_hf(src: str, dst: str, max_shard_bytes: int = 5 * 2**30, force: bool = False,
                quantize: Quantize | None = None) -> None:
    """An Orbax checkpoint (a step directory, or a training workdir / its checkpoints/ folder: the newest
    step) -> an HF directory; with `quantize`, in ModelOpt's quantized layout (`modelopt.py`)."""
    resolved = latest_checkpoint(os.path.abspath(src))
    if resolved != os.path.abspath(src):
        print(f"nemojax-convert: using the newest step, {resolved}", file=sys.stderr)
    src = resolved
    if checkpoint_format(src) != "orbax":
        raise CheckpointError(f"{src}: not a nemojax Orbax checkpoint (expected params/ and model/)")
    cfg = _unreadable_is_an_error(src, "model config", read_model_config, src)
    table = hf_table(cfg)
    tree = _unreadable_is_an_error(src, "parameter metadata", stored_params_tree, src)
    if is_stacked(tree):  # a training checkpoint of a scan_layers model: read whole, then per layer
        whole = unstack_layers(_unreadable_is_an_error(src, "parameters", restore_params_to_host, src),
                               cfg.hybrid_override_pattern)
        tree, restore = whole, lambda group: whole
    else:  # stream: one layer in memory at a time
        restore = lambda group: _unreadable_is_an_error(  # noqa: E731
            src, f"parameters {'/'.join(group[0].ours[0][0][:1])}", _restore_group, src, group)
    stored = _stored_dtypes(tree)
    # With tied embeddings transformers still reads (and writes) a separate head: it gets the embedding.
    tied_head = {EMBEDDINGS: TIED_HEAD} if cfg.tie_word_embeddings else {}
    plan, amax = _quantization_plan(src, cfg, table, quantize) if quantize else (None, {})
    planned = []
    for entry in table:
        dtype = stored["/".join(entry.ours[0][0])]
        for name, shape in entry.hf:
            if plan and name in plan.weights:
                layout = modelopt.quantized_layout(name.removesuffix(".weight"), plan.weights[name], shape, bool(amax))
                planned += [(n, dtype, s) for n, (dtype, s) in layout.items()]
                continue
            copies = (name, *([tied_head[name]] if name in tied_head else []))
            planned += [(copy, dtype, tuple(shape)) for copy in copies]
    with staged_output(dst, force) as out:
        writer = StreamingShards(out, planned, max_shard_bytes)
        done = 0
        with tqdm(total=writer.total, unit="B", unit_scale=True, desc="orbax-to-hf", file=sys.stderr) as bar:
            for group in layer_groups(table):
                params = restore(group)
                for entry in group:
                    values = [_get_path(params, path) for path, _ in entry.ours]
                    for (path, shape), value in zip(entry.ours, values):
                        if tuple(value.shape) != tuple(shape):
                            raise CheckpointError(f"{src}: parameter {'/'.join(path)} has shape {value.shape}, "
                                                  f"its config says {shape}")
                    for (name, _), tensor in zip(entry.hf, entry.to_hf(values)):
                        written = (_quantized(plan, name, tensor, amax) if plan and name in plan.weights else
                                   {copy: tensor for copy in (name, *([tied_head[name]] if name in tied_head else []))})
                        for copy, value in written.items():
                            writer.write(copy, value)
                            bar.update(value.nbytes)
                            done += 1
                    bar.set_postfix(tensors=f"{done}/{len(planned)}", refresh=False)
                del params
                release_freed_memory()
        writer.close()
        hf_config = cfg.to_hf()
        if plan:
            section = plan.quantization.to_json()
            hf_config["quantization_config"] = {"quant_method": "modelopt", **section}
            with open(os.path.join(out, modelopt.QUANT_CONFIG_FILE), "w") as f:
                json.dump({"producer": {"name": "nemojax"}, "quantization": section}, f, indent=2)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        _copy_assets(os.path.join(src, "assets"), out)


def _quantization_plan(src: str, cfg, table: list[Entry], quantize: Quantize):
    """The export plan and, from a calibration pass over the whole model, each quantized layer's input amax."""
    if quantize.recipe not in precision.SERVING_RECIPES:
        raise CheckpointError(f"--quantize {quantize.recipe!r}: expected one of {', '.join(precision.SERVING_RECIPES)}")
    plan = ptq.export_plan(cfg, [(name, shape) for entry in table for name, shape in entry.hf], quantize.recipe)
    for module in plan.kept_wide:
        print(f"nemojax-convert: {module} stays unquantized: its input width does not divide into NVFP4's "
              f"blocks of {modelopt.NVFP4_GROUP}", file=sys.stderr)
    if not quantize.batches:
        return plan, {}
    from nemojax.checkpoint.loading import load_checkpoint_params

    calibration_cfg = dataclasses.replace(cfg, scan_layers=False, dtype="float32")
    params = _unreadable_is_an_error(src, "parameters", load_checkpoint_params, src, calibration_cfg)
    tokenizer = quantize.tokenizer or os.path.join(src, "assets", "tokenizer.json")
    batches = ptq.calibration_batches(cfg, quantize.data, tokenizer, quantize.batches, quantize.seq_len)
    return plan, ptq.input_amax(calibration_cfg, params, batches)


def _quantized(plan, name: str, weight: np.ndarray, amax: dict[str, float]) -> dict[str, np.ndarray]:
    module = name.removesuffix(".weight")
    return modelopt.quantized_tensors(module, plan.weights[name], np.asarray(weight, np.float32),
                                      amax.get(ptq.policy_module(module)) if amax else None)
