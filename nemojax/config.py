"""ModelConfig: the Nemotron-H architecture, with Hugging Face's field names.

`ModelConfig.from_hf` reads any released `config.json` (old and new spellings) and validates it;
`to_hf` writes the current spelling back. Runtime choices that are not part of the checkpoint
(`param_dtype`, `dtype`, `remat`, `scan_layers`, kernels) live here too, so one object describes how a model is built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Pattern characters and the HF block-type names they stand for.
BLOCK_TYPES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
HF_BLOCK_NAMES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_HF_NAME_TO_CHAR = {v: k for k, v in HF_BLOCK_NAMES.items()}
_HF_NAME_TO_CHAR.update({"mamba": "M", "attention": "*"})  # legacy list spellings

# Older config.json spellings -> current field names.
LEGACY_NAMES = {
    "attention_head_dim": "head_dim",
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
}

_SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "scan_layers", "ssm_impl", "attention_impl",
                  "precision")  # not part of config.json
SSM_IMPLS = ("auto", "xla", "pallas")  # the chunked SSD scan: nemojax/ops/ssd.py or pallas/ssd.py
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
PRECISION_RECIPES = ("bf16", "fp8", "nvfp4", "mxfp8")  # nemojax/precision.py RECIPES  # nemojax/ops/attention.py, cuDNN flash (GPU), splash (TPU)
# What "auto" resolves to on each backend, (ssm_impl, attention_impl): the fused kernels on accelerators;
# XLA on the CPU, where Pallas kernels only run interpreted and cuDNN / splash do not exist.
AUTO_IMPLS = {"gpu": ("pallas", "cudnn"), "tpu": ("pallas", "splash"), "cpu": ("xla", "xla")}


class ConfigError(ValueError):
    """A config field has a value the model cannot be built from."""


def _fail(field: str, value: Any, rule: str) -> None:
    raise ConfigError(f"config field `{field}` = {value!r}: {rule}")


def _parse_float(value: Any) -> float:
    # transformers writes infinity as {"__float__": "Infinity"} in config.json.
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Nemotron-H / Nemotron Nano / Nemotron 3 model (HF field names)."""

    hybrid_override_pattern: str = "M-M*-"
    vocab_size: int = 131072
    hidden_size: int = 4096
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False
    # Attention.
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False  # read but unused, as in transformers: q/k/v/o have no bias
    # MLP.
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False  # biases on the MLP / shared expert up/down and the LatentMoE projections
    # Mamba-2.
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    expand: int = 2
    chunk_size: int = 128
    mamba_hidden_act: str = "silu"
    use_conv_bias: bool = True
    use_bias: bool = False  # biases on the Mamba in_proj and out_proj
    mamba_proj_bias: bool = False  # read but unused, as in transformers (use_bias decides)
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # MoE.
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # MTP (multi-token prediction).
    num_nextn_predict_layers: int = 0
    mtp_hybrid_override_pattern: str = "*E"
    # Tokens.
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    # nemojax runtime choices (not written to config.json).
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # rematerialise each block in the backward: none | full | dots (keep matmul outputs)
    scan_layers: bool = False  # scan over repeated groups of blocks (nemojax/scan_layers.py): fast compiles
    ssm_impl: str = "auto"  # "pallas": the fused SSD kernels (interpreted on the CPU); auto: AUTO_IMPLS
    attention_impl: str = "auto"  # "cudnn" on GPUs, "splash" on TPUs; auto: AUTO_IMPLS
    precision: str = "bf16"  # the linear layers' low-precision recipe (nemojax/precision.py RECIPES)

    def __post_init__(self) -> None:
        self.validate()

    # ----- derived sizes -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layers_block_type(self) -> tuple[str, ...]:
        return tuple(HF_BLOCK_NAMES[c] for c in self.hybrid_override_pattern)

    @property
    def has_moe(self) -> bool:
        return "E" in self.hybrid_override_pattern

    @property
    def moe_input_size(self) -> int:
        """Width the routed experts work in: the latent size for LatentMoE, else hidden."""
        return self.moe_latent_size or self.hidden_size

    def kernel_impls(self, backend: str | None = None) -> tuple[str, str]:
        """(ssm_impl, attention_impl) with "auto" resolved for `backend` (default: the trace's target)."""
        if backend is None:
            from nemojax.ops.platform import target_backend

            backend = target_backend()
        auto = AUTO_IMPLS.get(backend, AUTO_IMPLS["cpu"])
        return (auto[0] if self.ssm_impl == "auto" else self.ssm_impl,
                auto[1] if self.attention_impl == "auto" else self.attention_impl)

    # ----- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        pattern = self.hybrid_override_pattern
        if not isinstance(pattern, str) or not pattern:
            _fail("hybrid_override_pattern", pattern, "must be a non-empty string of M, *, -, E")
        for i, c in enumerate(pattern):
            if c not in BLOCK_TYPES:
                _fail("hybrid_override_pattern", pattern,
                      f"unknown pattern character {c!r} at position {i}; allowed: M (Mamba-2), * (attention), "
                      "- (MLP), E (MoE)")
        for i, c in enumerate(self.mtp_hybrid_override_pattern):
            if c not in BLOCK_TYPES:
                _fail("mtp_hybrid_override_pattern", self.mtp_hybrid_override_pattern,
                      f"unknown pattern character {c!r} at position {i}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "intermediate_size", "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups",
                     "conv_kernel", "chunk_size", "n_routed_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_attention_heads", self.num_attention_heads,
                  f"must be divisible by num_key_value_heads = {self.num_key_value_heads}")
        if self.mamba_num_heads % self.n_groups:
            _fail("mamba_num_heads", self.mamba_num_heads, f"must be divisible by n_groups = {self.n_groups}")
        if self.mlp_hidden_act != "relu2":
            _fail("mlp_hidden_act", self.mlp_hidden_act, "only 'relu2' (squared ReLU) is supported")
        if self.mamba_hidden_act != "silu":
            _fail("mamba_hidden_act", self.mamba_hidden_act, "only 'silu' is supported")
        for name in ("attention_bias", "mlp_bias", "use_bias", "mamba_proj_bias", "use_conv_bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        if len(self.time_step_limit) != 2 or self.time_step_limit[0] > self.time_step_limit[1]:
            _fail("time_step_limit", self.time_step_limit, "must be a pair (low, high) with low <= high")
        if not 0 < self.time_step_min <= self.time_step_max:
            _fail("time_step_min", self.time_step_min, f"must satisfy 0 < time_step_min <= time_step_max "
                  f"= {self.time_step_max}")
        if "E" in pattern or "E" in (self.mtp_hybrid_override_pattern if self.num_nextn_predict_layers else ""):
            self._validate_moe()
        for name, allowed in (("remat", REMAT_POLICIES), ("ssm_impl", SSM_IMPLS),
                              ("attention_impl", ATTENTION_IMPLS), ("precision", PRECISION_RECIPES)):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"must be one of {allowed}")
        if not isinstance(self.scan_layers, bool):
            _fail("scan_layers", self.scan_layers, "must be True or False")
        for name in ("param_dtype", "dtype", "mamba_ssm_cache_dtype"):
            if getattr(self, name) not in _SUPPORTED_DTYPES:
                _fail(name, getattr(self, name), f"must be one of {_SUPPORTED_DTYPES}")

    def _validate_moe(self) -> None:
        if self.n_routed_experts % self.n_group:
            _fail("n_routed_experts", self.n_routed_experts, f"must be divisible by n_group = {self.n_group}")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"must be <= n_group = {self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2:
            _fail("n_group", self.n_group, "group-limited routing scores each group by its top-2 experts, "
                  f"so every group needs >= 2 experts (have {per_group})")
        if self.num_experts_per_tok > self.topk_group * per_group:
            _fail("num_experts_per_tok", self.num_experts_per_tok,
                  f"must be <= topk_group x experts per group = {self.topk_group * per_group}")
        if self.n_shared_experts not in (0, 1):
            _fail("n_shared_experts", self.n_shared_experts, "must be 0 or 1")
        if self.moe_latent_size is not None and (not isinstance(self.moe_latent_size, int)
                                                 or self.moe_latent_size <= 0):
            _fail("moe_latent_size", self.moe_latent_size, "must be a positive integer or null")

    # ----- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Build from a config.json dict; unknown HF keys (rope fields, auto_map, ...) are ignored."""
        hf = dict(hf)
        if hf.get("model_type", "nemotron_h") != "nemotron_h":
            _fail("model_type", hf["model_type"], "expected 'nemotron_h'")
        for old, new in LEGACY_NAMES.items():
            if old in hf:
                value = hf.pop(old)
                hf.setdefault(new, value)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in hf.items() if k in fields}
        kwargs["hybrid_override_pattern"] = _pattern_from_hf(hf, "hybrid_override_pattern", "layers_block_type")
        if kwargs["hybrid_override_pattern"] is None:
            _fail("hybrid_override_pattern", None, "config.json needs hybrid_override_pattern or layers_block_type")
        mtp = _pattern_from_hf(hf, "mtp_hybrid_override_pattern", "mtp_layers_block_type")
        if mtp is not None:
            kwargs["mtp_hybrid_override_pattern"] = mtp
        declared = hf.get("num_hidden_layers")
        if declared is not None and declared != len(kwargs["hybrid_override_pattern"]):
            _fail("num_hidden_layers", declared,
                  f"does not match the pattern's {len(kwargs['hybrid_override_pattern'])} layers")
        if "time_step_limit" in kwargs:
            kwargs["time_step_limit"] = tuple(_parse_float(v) for v in kwargs["time_step_limit"])
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        for name in ("time_step_min", "time_step_max", "time_step_floor", "routed_scaling_factor",
                     "layer_norm_epsilon"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers reads (current field names)."""
        out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        for f in dataclasses.fields(self):
            if f.name in (*RUNTIME_FIELDS, "hybrid_override_pattern", "mtp_hybrid_override_pattern"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["time_step_limit"] = [v if math.isfinite(v) else {"__float__": "Infinity"}
                                  for v in self.time_step_limit]
        out["layers_block_type"] = list(self.layers_block_type)
        out["mtp_layers_block_type"] = [HF_BLOCK_NAMES[c] for c in self.mtp_hybrid_override_pattern]
        out["num_hidden_layers"] = self.num_hidden_layers
        out["dtype"] = self.param_dtype
        return out


def _pattern_from_hf(hf: dict[str, Any], pattern_key: str, list_key: str) -> str | None:
    if hf.get(pattern_key) is not None:
        return hf[pattern_key]
    blocks = hf.get(list_key)
    if blocks is None:
        return None
    if not isinstance(blocks, (list, tuple)):
        _fail(list_key, blocks, "must be a list of block-type names")
    chars = []
    for i, name in enumerate(blocks):
        if name not in _HF_NAME_TO_CHAR:
            _fail(list_key, blocks, f"unknown block type {name!r} at position {i}; allowed: "
                  f"{sorted(HF_BLOCK_NAMES.values())}")
        chars.append(_HF_NAME_TO_CHAR[name])
    return "".join(chars)
