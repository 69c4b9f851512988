"""The Mamba-2 mixer: in-projections, causal conv + SiLU, SSD scan, gated norm, out-projection.

The input projection is kept as five weights (z, x, B, C, dt) rather than HF's one fused `in_proj`,
so tensor parallelism shards each along heads or groups; the checkpoint loader splits HF's tensor.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from nemojax.config import ModelConfig
from nemojax.layers.common import Decoding, Gemms, normal, param, projection
from nemojax.layers.norms import GatedGroupRMSNorm
from nemojax.ops.conv import causal_conv1d_silu, conv_step
from nemojax.ops.ssd import ssd_chunked, ssd_step
from nemojax.ops.sequence_parallel import conv_sequence_sharded, ssd_sequence_sharded
from nemojax.sharding import SEQUENCE_AXIS, sequence_axis_size, shard_map_logical


def _a_log_init(key, shape, dtype):
    del key
    return jnp.log(jnp.arange(1, shape[0] + 1, dtype=jnp.float32)).astype(dtype)


def _dt_bias_init(cfg: ModelConfig):
    """Inverse softplus of dt drawn log-uniformly in [time_step_min, time_step_max] (Mamba-2's init)."""
    def init(key, shape, dtype):
        lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
        dt = jnp.exp(jax.random.uniform(key, shape) * (hi - lo) + lo)
        dt = jnp.maximum(dt, cfg.time_step_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
    return init


def _conv_init(width: int):
    bound = 1.0 / math.sqrt(width)  # PyTorch's Conv1d default for a depthwise filter
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def chunked_scan(cfg: ModelConfig, segment_ids: jax.Array | None = None):
    """(x, dt, A, B, C, D[, initial_state]) -> (y, final state) by `cfg.ssm_impl`: the XLA scan, or the
    Pallas kernels, which run on each device's own (batch, heads) shard. `segment_ids`: packed documents
    kept apart. Under a sequence-sharded mesh each device scans its span and the shards exchange states
    (`ops/sequence_parallel.py`); a chunked prefill's initial state does not combine with that."""
    xla = cfg.kernel_impls()[0] == "xla"
    sharded_sequence = sequence_axis_size() > 1
    if xla and not sharded_sequence:
        return lambda x, dt, A, B, C, D, initial_state=None: ssd_chunked(
            x, dt, A, B, C, cfg.chunk_size, D=D, initial_state=initial_state, segment_ids=segment_ids)
    if xla:
        local = ssd_chunked
    else:
        from pallas.ssd import ssd as local
    if sharded_sequence:
        local = functools.partial(ssd_sequence_sharded, local_scan=local, axis=SEQUENCE_AXIS)

    heads, groups = ("batch", "length", "ssm_heads"), ("batch", "length", "ssm_groups", None)
    state = ("batch", "ssm_heads", None, None)
    in_axes = ((*heads, None), heads, ("ssm_heads",), groups, groups, ("ssm_heads",))

    def scan(x, dt, A, B, C, D, initial_state=None):
        optional = {"segment_ids": (segment_ids, ("batch", "length")), "initial_state": (initial_state, state)}
        given = {name: value for name, value in optional.items() if value[0] is not None}
        if sharded_sequence and initial_state is not None:
            raise ValueError("a Mamba scan with an initial state (chunked prefill) cannot run on a sequence-sharded "
                             "mesh: prefill with mesh.sequence = 1")

        def body(x, dt, A, B, C, D, *extra):
            return local(x, dt, A, B, C, cfg.chunk_size, D=D, **dict(zip(given, extra)))

        return shard_map_logical(body, in_axes=(*in_axes, *(axes for _, axes in given.values())),
                                 out_axes=[(*heads, None), state])(x, dt, A, B, C, D, *(v for v, _ in given.values()))

    return scan


def depthwise_conv(segment_ids: jax.Array | None, axes: tuple[str, ...]):
    """(t, weight, bias) -> silu(causal conv); under a sequence-sharded mesh each span takes the previous
    one's last K - 1 inputs (`ops/sequence_parallel.py`)."""
    if sequence_axis_size() == 1:
        return lambda t, weight, bias: causal_conv1d_silu(t, weight, bias, segment_ids)
    t_axes = ("batch", "length", *axes)
    if segment_ids is None:
        return shard_map_logical(lambda t, w, b: conv_sequence_sharded(t, w, b, axis=SEQUENCE_AXIS),
                                 in_axes=(t_axes, ("conv_width", *axes), axes), out_axes=t_axes)
    conv = shard_map_logical(lambda t, w, b, seg: conv_sequence_sharded(t, w, b, seg, axis=SEQUENCE_AXIS),
                             in_axes=(t_axes, ("conv_width", *axes), axes, ("batch", "length")), out_axes=t_axes)
    return lambda t, weight, bias: conv(t, weight, bias, segment_ids)


def _rows_slice(t: jax.Array, starts: jax.Array, count: int) -> jax.Array:
    """Per row b, the `count` entries of t (time axis 1) from index starts[b]."""
    return jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, count, axis=0))(t, starts)


def _into_slots(states: jax.Array, slots: int) -> jax.Array:
    """[b, t, ...] states after each of t tokens -> [b, slots, ...], the last one repeated into spare slots."""
    t = states.shape[1]
    assert t <= slots, f"a decoding call of {t} tokens needs at least {t} Mamba cache slots, the cache has {slots}"
    if t == slots:
        return states
    spare = jnp.broadcast_to(states[:, -1:], (states.shape[0], slots - t, *states.shape[2:]))
    return jnp.concatenate([states, spare], axis=1)


def _resumed(slots: jax.Array, resume: jax.Array | int) -> jax.Array:
    """Each row's slot `resume[b]` of a [b, slots, ...] cache (a plain slice when every row takes the same
    static slot, as plain decoding does: a gather would make XLA copy the cache every step)."""
    if isinstance(resume, int):
        return slots[:, resume]
    rows = jnp.arange(slots.shape[0])
    return slots[rows, jnp.broadcast_to(resume, rows.shape)]


class Mamba2Mixer(nn.Module):
    """Training and prefill run the chunked SSD over the sequence; a decoding step runs the recurrence
    once (`ssd_step`), from the cached SSM state and the last K-1 conv inputs."""

    cfg: ModelConfig
    gemms: Gemms = Gemms()

    @nn.compact
    def __call__(self, u: Float[Array, "b l d"], decoding: Decoding | None = None,
                 segment_ids: Int[Array, "b l"] | None = None) -> Float[Array, "b l d"]:
        cfg = self.cfg
        pdt, cdt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        d, h, p, g, n, k = (cfg.hidden_size, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups,
                            cfg.ssm_state_size, cfg.conv_kernel)
        init = normal(cfg.initializer_range)
        heads, groups = ("ssm_heads", "ssm_head_dim"), ("ssm_groups", "ssm_state")
        stepping = decoding is not None and not decoding.prefill

        def project(name, shape, axes):  # the five parts of the Hub's in_proj, in its format
            return projection(self, name, u, init, (d, *shape), ("embed", *axes), 1, cfg.use_bias, pdt, cdt,
                              self.gemms.of(self, "in_proj"))

        z, x = project("in_z", (h, p), heads), project("in_x", (h, p), heads)
        B, C = project("in_B", (g, n), groups), project("in_C", (g, n), groups)
        dt = project("in_dt", (h,), ("ssm_heads",))

        def conv(name, t, axes):
            weight = param(self, f"conv_{name}", _conv_init(k), (k, *t.shape[2:]), ("conv_width", *axes), pdt)
            bias = (param(self, f"conv_{name}_bias", _conv_init(k), t.shape[2:], axes, pdt) if cfg.use_conv_bias
                    else jnp.zeros(t.shape[2:], pdt))
            if decoding is None:
                return depthwise_conv(segment_ids, axes)(t, weight, bias)
            # Per row and slot, the last K-1 conv inputs (see `Decoding`).
            cached = self.variable("cache", f"conv_{name}", jnp.zeros,
                                   (t.shape[0], decoding.slots, k - 1, *t.shape[2:]), t.dtype)
            window = jnp.concatenate([_resumed(cached.value, decoding.resume), t], axis=1)
            if decoding.prefill:  # after the K - 1 inputs before this call (zeros at the prompt's start)
                # The K - 1 inputs before each row's end: window index j holds this call's position j - K + 1.
                real = jnp.clip(decoding.lengths - decoding.offset, 0, t.shape[1])  # the row's tokens in this call
                cached.value = _into_slots(_rows_slice(window, real, k - 1)[:, None], decoding.slots)
                return causal_conv1d_silu(window, weight, bias)[:, k - 1:]
            steps = range(t.shape[1])
            cached.value = _into_slots(jnp.stack([window[:, i + 1:i + k] for i in steps], axis=1), decoding.slots)
            return jnp.stack([conv_step(window[:, i:i + k], weight, bias) for i in steps], axis=1)

        x, B, C = conv("x", x, heads), conv("B", B, groups), conv("C", C, groups)

        dt_bias = param(self, "dt_bias", _dt_bias_init(cfg), (h,), ("ssm_heads",), pdt)
        A_log = param(self, "A_log", _a_log_init, (h,), ("ssm_heads",), pdt)
        D = param(self, "D", jax.nn.initializers.ones, (h,), ("ssm_heads",), pdt)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        # dt is clamped to time_step_limit, as in mamba_ssm and transformers >= 5.15 (earlier versions clamped
        # below at time_step_min, which only sets the dt_bias init). transformers' decoding step does not
        # clamp; ours does, so that decoding equals the full-sequence forward. The released limit, (0, inf),
        # leaves softplus's output unchanged.
        dt = jnp.clip(dt, *cfg.time_step_limit)
        A = -jnp.exp(A_log.astype(jnp.float32))

        if decoding is None:
            y, _ = chunked_scan(cfg, segment_ids)(x, dt, A, B, C, D)
        else:
            cache_dtype = jnp.dtype(cfg.mamba_ssm_cache_dtype)
            ssm = self.variable("cache", "ssm", jnp.zeros, (u.shape[0], decoding.slots, h, p, n), cache_dtype)
            if stepping:  # the recurrence, token by token; every token's state is kept (see `Decoding`)
                state, ys, states = _resumed(ssm.value, decoding.resume), [], []
                for i in range(u.shape[1]):
                    y_i, state = ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D)
                    state = state.astype(cache_dtype)
                    ys.append(y_i)
                    states.append(state)
                y, states = jnp.stack(ys, axis=1), jnp.stack(states, axis=1)
            else:  # padded steps get dt = 0: no decay and no input, so the final state is the last real token's
                real = decoding.offset + jnp.arange(u.shape[1])[None, :] < decoding.lengths[:, None]
                entering = _resumed(ssm.value, decoding.resume).astype(jnp.float32)  # zeros at the prompt's start
                y, state = chunked_scan(cfg)(x, jnp.where(real[..., None], dt, 0.0), A, B, C, D, entering)
                states = state.astype(cache_dtype)[:, None]
            ssm.value = _into_slots(states, decoding.slots)
        y = GatedGroupRMSNorm(g, cfg.layer_norm_epsilon, pdt, name="norm")(y, z)
        out_init = normal(cfg.initializer_range / math.sqrt(cfg.num_hidden_layers)
                          if cfg.rescale_prenorm_residual else cfg.initializer_range)
        return projection(self, "out_proj", y, out_init, (h, p, d), (*heads, "embed"), 2, cfg.use_bias, pdt, cdt,
                          self.gemms.of(self, "out_proj"))
