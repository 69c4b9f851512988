"""nemojax: NVIDIA's hybrid Mamba-Transformer (Nemotron-H family) in JAX/Flax."""

from nemojax.checkpoint.hf import CheckpointError, load_hf
from nemojax.config import ConfigError, ModelConfig
from nemojax.generate import generate
from nemojax.model import NemotronH

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "NemotronH", "generate", "load_hf"]
