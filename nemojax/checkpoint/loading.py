"""Load a model from whatever checkpoint a user points at: an Orbax checkpoint (a training step or a
converted one, or a workdir: its newest step) or a Hugging Face Hub directory. The one place that decides
which (`checkpoint_format`); train.py's init_from, eval.py and the converter all ask it."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nemojax.checkpoint.hf import CheckpointError, load_hf, read_config
from nemojax.checkpoint.orbax_io import is_orbax_checkpoint, latest_checkpoint, load_params, read_model_config
from nemojax.config import ModelConfig
from nemojax.model import NemotronH


def abstract_params(cfg: ModelConfig, boxed: bool = False) -> Any:
    """The parameter tree's shapes and dtypes, without allocating it (`boxed`: with the logical axis names
    the sharding rules read)."""
    shapes = jax.eval_shape(lambda: NemotronH(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return shapes["params"] if boxed else nn.unbox(shapes["params"])


def checkpoint_format(path: str) -> str:
    """"orbax" or "hf" for a checkpoint directory; a clear error for anything else."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file or directory")
    if is_orbax_checkpoint(path):
        return "orbax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise CheckpointError(f"checkpoint {path!r} is not a model: expected an Orbax checkpoint (params/ and model/, "
                          "e.g. WORKDIR/checkpoints/STEP or the converter's output) or a Hugging Face directory "
                          "(config.json + safetensors)")


def read_checkpoint_config(path: str, **runtime: Any) -> ModelConfig:
    """The architecture a checkpoint stores, with `runtime` fields set (parameters keep its dtype unless
    `param_dtype=` says otherwise). A training workdir means its newest checkpoint."""
    path = latest_checkpoint(path)
    return read_model_config(path, **runtime) if checkpoint_format(path) == "orbax" else read_config(path, **runtime)


def load_checkpoint_params(path: str, cfg: ModelConfig, abstract: Any | None = None) -> Any:
    """`path`'s parameters for a model built from `cfg` (its layout and dtype), placed like `abstract`
    (ShapeDtypeStructs with shardings; default: `abstract_params(cfg)`, one device)."""
    abstract = abstract_params(cfg) if abstract is None else abstract
    path = latest_checkpoint(path)
    if checkpoint_format(path) == "orbax":
        return load_params(path, abstract)
    _, params = load_hf(path, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers)
    return jax.tree.map(lambda p, a: jax.device_put(p, a.sharding), params, abstract)


def load_model(path: str, **runtime: Any) -> tuple[ModelConfig, Any, dict | None]:
    """(config, params, the training config when `path` is a training checkpoint step, else None).

    `runtime` sets ModelConfig's runtime fields (param_dtype, dtype); parameters otherwise keep the
    checkpoint's dtype.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file or directory")
    path = latest_checkpoint(path)  # a training workdir or its checkpoints/ folder: the newest step
    cfg = read_checkpoint_config(path, **runtime)
    return cfg, load_checkpoint_params(path, cfg), _training_config(path)


def _training_config(path: str) -> dict | None:
    """The training config a training checkpoint step carries (None for converted and HF checkpoints)."""
    if not os.path.isdir(os.path.join(path, "config")):
        return None
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(os.path.abspath(path), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]
