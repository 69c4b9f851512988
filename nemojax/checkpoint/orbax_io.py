"""Orbax checkpoints: the training checkpoints in a workdir, and parameter-only checkpoints.

A checkpoint step directory holds items, each a subdirectory:
- `params`: the parameter tree (OCDBT / tensorstore), `model`: the architecture as HF config.json fields;
- training checkpoints add `opt_state`, `meta` (step and RNG), `data` (the grain iterator state, one file
  per host) and `config` (the full training config).
`load_params` reads `params` + `model` from either kind, so `train.py --config.init_from=` and `eval.py`
take a training step directory or a converted checkpoint alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from nemojax.checkpoint.hf import config_from_json
from nemojax.config import ConfigError, ModelConfig
from nemojax.scan_layers import is_stacked, to_layout


class _IteratorSnapshot:
    """The grain iterator state at save time. Saving happens in the background, and the live iterator
    moves on meanwhile; grain's handler stores this frozen copy (`iterator_state` reads it back)."""

    def __init__(self, state: dict):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def start_prefetch(self) -> None:
        pass


def iterator_state(data_dir: str) -> dict:
    """This process's data iterator state from a checkpoint's `data` item (grain writes one
    `process_{i}-of-{n}.json` per process). Written by another number of processes, the state is
    taken when every process's is the same: the pipeline (`nemojax.data.pipeline.batches`) shuffles
    before splitting batches over hosts, so "n batches read" means the same global position for any
    host count."""
    own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    if os.path.exists(own):
        with open(own) as f:
            return json.load(f)
    files = sorted(f for f in os.listdir(data_dir) if f.startswith("process_") and f.endswith(".json"))
    states = []
    for name in files:
        with open(os.path.join(data_dir, name)) as f:
            states.append(json.load(f))
    if not states:
        raise ValueError(f"{data_dir}: no data iterator state (process_*-of-*.json)")
    if any(state != states[0] for state in states):
        raise ValueError(f"{data_dir}: written by {len(states)} processes whose data iterators stand at different "
                         f"places ({states}); resume it with {len(states)} processes")
    return states[0]


class TrainCheckpoints:
    """Async CheckpointManager over WORKDIR/checkpoints keeping the last `keep` steps."""

    def __init__(self, workdir: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                             options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Committed steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def path(self, step: int) -> str:
        return os.path.join(str(self.manager.directory), str(step))

    def saved_config(self, step: int) -> dict:
        """The training config a step was written with."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def move_aside(self, step: int) -> str:
        """Move a step that cannot be restored to WORKDIR/corrupt_checkpoints/ (kept, never deleted)."""
        aside = os.path.join(os.path.dirname(str(self.manager.directory)), "corrupt_checkpoints")
        target = os.path.join(aside, str(step))
        suffix = 1
        while os.path.exists(target):
            target, suffix = os.path.join(aside, f"{step}.{suffix}"), suffix + 1
        if jax.process_index() == 0:  # one process moves it; the others wait until it has
            os.makedirs(aside, exist_ok=True)
            os.rename(self.path(step), target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"nemojax: moved aside checkpoint {step}", timeout=600)
        self.manager.reload()
        return target

    def save(self, step: int, state: Any, rng: jax.Array, iterator_state: dict, config: dict,
             cfg: ModelConfig) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave({"step": int(step), "rng": jax.random.key_data(rng).tolist()}),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator_state)),
            config=ocp.args.JsonSave(config),
            model=ocp.args.JsonSave(cfg.to_hf()),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, jax.Array, dict]:
        """(state with the given abstract state's structure and shardings, rng, iterator state)."""
        step_dir = self.path(step)
        stored_scanned = is_stacked(stored_params_tree(step_dir))
        if stored_scanned != is_stacked(abstract_state.params):
            raise ConfigError(f"config field `scan_layers` = {not stored_scanned}: checkpoint {step_dir} was "
                              f"written with scan_layers={stored_scanned}; resume with --config.scan_layers="
                              f"{stored_scanned} (the optimizer state keeps its layout), or start a new workdir "
                              f"with --config.init_from={step_dir}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            meta=ocp.args.JsonRestore(),
        ))
        meta = restored["meta"]
        rng = jax.random.wrap_key_data(jax.numpy.asarray(meta["rng"], jax.numpy.uint32))
        state = abstract_state._replace(step=jax.numpy.asarray(meta["step"], jax.numpy.int32),
                                        params=restored["params"], opt_state=restored["opt_state"])
        return state, rng, iterator_state(os.path.join(step_dir, "data"))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def read_model_config(path: str, **runtime: Any) -> ModelConfig:
    """The architecture stored with an Orbax checkpoint (its `model` item); parameters keep the stored
    dtype (config.json's `dtype`) unless `param_dtype=` says otherwise."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        hf = checkpointer.restore(os.path.abspath(path), args=ocp.args.Composite(model=ocp.args.JsonRestore()))
    return config_from_json(hf["model"], **runtime)


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "model"))


def latest_checkpoint(path: str) -> str:
    """`path` itself when it is a checkpoint; for a training workdir or its `checkpoints/` folder, the
    newest committed step in it; otherwise `path` unchanged (the caller reports what it is not)."""
    if is_orbax_checkpoint(path):
        return path
    folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(folder):
        return path
    steps = [int(name) for name in os.listdir(folder)
             if name.isdigit() and is_orbax_checkpoint(os.path.join(folder, name))]
    return os.path.join(folder, str(max(steps))) if steps else path


def stored_params_tree(path: str) -> dict:
    """The `params` item's tree of array metadata (shape, dtype), read without reading an array."""
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        return checkpointer.metadata(os.path.join(os.path.abspath(path), "params")).item_metadata.tree


def restore_params_to_host(path: str) -> dict:
    """The whole `params` item as numpy arrays, in the layout it was written in."""
    to_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored_params_tree(path))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(os.path.abspath(path), args=ocp.args.Composite(
            params=ocp.args.PyTreeRestore(item=to_numpy, restore_args=to_numpy)))
    return restored["params"]


def load_params(path: str, abstract_params: Any) -> Any:
    """The `params` item of an Orbax checkpoint, restored into `abstract_params`' shapes, dtypes and
    shardings (a tree of `jax.ShapeDtypeStruct`s). A checkpoint written with the other `scan_layers`
    layout is read to the host and restacked (nemojax/scan_layers.py)."""
    scanned = is_stacked(abstract_params)
    if is_stacked(stored_params_tree(path)) != scanned:
        pattern = read_model_config(path).hybrid_override_pattern
        params = to_layout(restore_params_to_host(path), pattern, scanned)
        return jax.tree.map(lambda v, a: jax.device_put(v.astype(a.dtype), a.sharding), params, abstract_params)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(os.path.abspath(path), args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
    return restored["params"]
