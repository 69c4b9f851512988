"""Load a model from whatever checkpoint a user points at: an Orbax checkpoint (a training step or a
converted one) or a Hugging Face Hub directory."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nemojax.checkpoint.hf import CheckpointError, load_hf
from nemojax.checkpoint.orbax_io import is_orbax_checkpoint, latest_checkpoint, load_params, read_model_config
from nemojax.config import ModelConfig
from nemojax.model import NemotronH


def abstract_params(cfg: ModelConfig) -> Any:
    """The parameter tree's shapes and dtypes, without allocating it."""
    shapes = jax.eval_shape(lambda: NemotronH(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return nn.unbox(shapes["params"])


def load_model(path: str, **runtime: Any) -> tuple[ModelConfig, Any, dict | None]:
    """(config, params, the training config when `path` is a training checkpoint step, else None).

    `runtime` sets ModelConfig's runtime fields (param_dtype, dtype); parameters otherwise keep the
    checkpoint's dtype.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file or directory")
    path = latest_checkpoint(path)  # a training workdir or its checkpoints/ folder: the newest step
    if is_orbax_checkpoint(path):
        cfg = read_model_config(path, **runtime)
        return cfg, load_params(path, abstract_params(cfg)), _training_config(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        cfg, params = load_hf(path, **runtime)
        return cfg, params, None
    raise CheckpointError(f"checkpoint {path!r} is not a model: expected an Orbax checkpoint (params/ and model/, "
                          "e.g. WORKDIR/checkpoints/STEP or the converter's output) or a Hugging Face directory "
                          "(config.json + safetensors)")


def _training_config(path: str) -> dict | None:
    if not os.path.isdir(os.path.join(path, "config")):
        return None
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(os.path.abspath(path), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]
