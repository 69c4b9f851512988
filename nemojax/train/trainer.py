"""The training loop behind `train.py`: build, resume or initialise, step, log, checkpoint.

Resuming is automatic: with a checkpoint in WORKDIR/checkpoints, the run continues from the latest one
(parameters, optimizer state, step, RNG and the data iterator), and its metrics and losses continue
exactly as if it had never stopped. SIGTERM (preemption) saves a checkpoint, then exits.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from nemojax.checkpoint.hf import error_summary
from nemojax.checkpoint.loading import abstract_params, load_checkpoint_params, read_checkpoint_config
from nemojax.checkpoint.orbax_io import TrainCheckpoints
from nemojax.config import RUNTIME_FIELDS, ConfigError, ModelConfig
from nemojax.data.pipeline import batches, eval_batches, train_source
from nemojax.data.posttrain import TASKS
from nemojax.flops import train_flops
from nemojax.loss import eval_metrics, eval_sums, eval_totals
from nemojax.model import NemotronH
from nemojax.sharding import (
    batch_sharding,
    check_expert_mesh,
    logical_shardings,
    make_mesh,
    replicated,
    smallest_batch,
)
from nemojax.train.metrics import MetricsWriter, NonFiniteLoss, StepLog, device_peak_flops
from nemojax.train.dpo import Preference, dpo_eval_metrics, dpo_eval_sums, reply_logprobs
from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
from nemojax.train.step import TrainState, train_step
from nemojax.train.workdir import WorkdirLock

# config.json fields that do not change a model's parameters or outputs (allowed to differ on init_from).
_HARMLESS_FIELDS = {"architectures", "dtype", "max_position_embeddings", "bos_token_id", "eos_token_id",
                    "pad_token_id", "initializer_range", "rescale_prenorm_residual", "chunk_size",
                    "mamba_ssm_cache_dtype", "time_step_min", "time_step_max", "time_step_floor"}


def mirror_shardings(tree: Any, abstract_params: Any, default: Any) -> Any:
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path (Adam's moments
    mirror the parameter tree) and has its shape gets that parameter's sharding; others get `default`."""
    def keys(path):
        return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))

    by_path = {keys(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}

    def pick(path, leaf):
        names = keys(path)
        for start in range(len(names)):
            param = by_path.get(names[start:])
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


# Fields a resumed run may change freely: they do not change the trajectory (total_steps bends the
# schedule, and is said).
RESUMABLE_CHANGES = ("total_steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "init_from",
                     "model_from_checkpoint", "mesh", "remat", "ssm_impl", "attention_impl", "peak_flops_per_device",
                     "allow_config_change")


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, now)} for every field both configs have that differs, nested fields dotted; tuples
    compare as lists. A field only one side has comes from another version of nemojax and is not compared."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    old, new = flat(saved), flat(json.loads(json.dumps(config.to_dict())))
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def check_resume_config(step: int, saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Raise on a change that would alter the resumed trajectory (unless allowed); the changes to say."""
    changes = config_changes(saved, config)
    resumable = set(RESUMABLE_CHANGES) - ({"init_from"} if config.task == "dpo" else set())  # DPO's reference
    fixed = {k: v for k, v in changes.items() if k.split(".")[0] not in resumable}
    if fixed and not config.allow_config_change:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in fixed.items())
        raise ConfigError(f"resuming from step {step} with a different config ({listed}): use the checkpoint's "
                          "values, a new workdir, or --config.allow_config_change=True")
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items() if k != "allow_config_change"]


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); nothing from the bad state was saved."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the last finished step has been written."""


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    runtime = {name: config[name] for name in RUNTIME_FIELDS}
    if config.model_from_checkpoint:
        if not config.init_from:
            raise ConfigError("config field `model_from_checkpoint` = True needs `init_from`")
        return read_checkpoint_config(config.init_from, **runtime)
    return ModelConfig.from_hf(config.model.to_dict(), **runtime)


def check_same_architecture(source: str, theirs: ModelConfig, ours: ModelConfig) -> None:
    a, b = theirs.to_hf(), ours.to_hf()
    diffs = [f"{k}: checkpoint {a.get(k)!r}, config {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if k not in _HARMLESS_FIELDS and a.get(k) != b.get(k)]
    if diffs:
        raise ConfigError(f"init_from {source}: the checkpoint's architecture differs from config.model "
                         f"(set --config.model_from_checkpoint=True to take the checkpoint's): " + "; ".join(diffs))


def _validate(config: ml_collections.ConfigDict) -> None:
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(f"config field `batch_size` = {config.batch_size}: must divide by "
                         f"grad_accum_steps = {config.grad_accum_steps}")
    for name in ("total_steps", "checkpoint_every", "log_every", "seq_len", "batch_size", "keep_checkpoints"):
        if config[name] <= 0:
            raise ConfigError(f"config field `{name}` = {config[name]}: must be positive")
    if config.seq_len < 2:
        raise ConfigError(f"config field `seq_len` = {config.seq_len}: must be >= 2 (a window needs an input "
                          "token and a target)")
    if config.task not in TASKS:
        raise ConfigError(f"config field `task` = {config.task!r}: expected one of {', '.join(TASKS)}")
    if config.task == "dpo":
        if config.dpo.reference not in ("model", "precomputed"):
            raise ConfigError(f"config field `dpo.reference` = {config.dpo.reference!r}: expected 'model' or "
                              "'precomputed'")
        if not config.init_from:
            raise ConfigError("task 'dpo' needs `init_from`: the model to start from, which is also the frozen "
                              "reference")
        if not 0 <= config.dpo.label_smoothing < 0.5 or config.dpo.beta <= 0:
            raise ConfigError(f"config fields `dpo.beta` = {config.dpo.beta} must be > 0 and "
                              f"`dpo.label_smoothing` = {config.dpo.label_smoothing} in [0, 0.5)")


def _say(text: str) -> None:
    """One line on stderr from the first process (resuming, fallbacks, compiling)."""
    if jax.process_index() == 0:
        print(f"train.py: {text}", file=sys.stderr, flush=True)


def abstract_train_state(model: NemotronH, optimizer, mesh) -> tuple[TrainState, TrainState]:
    """(the train state as ShapeDtypeStructs carrying their shardings, the shardings), allocating nothing."""
    boxed = abstract_params(model.cfg, boxed=True)
    param_shardings = logical_shardings(boxed, mesh)
    abstract = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)
    params = abstract(nn.unbox(boxed), param_shardings)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = mirror_shardings(opt_shapes, params, replicated(mesh))
    shardings = TrainState(replicated(mesh), param_shardings, opt_shardings)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    return TrainState(step, params, abstract(opt_shapes, opt_shardings)), shardings


def jitted_train_step(config: ml_collections.ConfigDict, model: NemotronH, optimizer, schedule, mesh,
                      state_shardings: TrainState):
    """The train step jitted with the state's shardings and the batch split over the data axes; a DPO
    step against a reference model takes the frozen parameters as a third argument (sharded as the
    trained ones)."""
    step = functools.partial(train_step, model, optimizer, grad_accum_steps=config.grad_accum_steps,
                             aux_loss_coef=config.moe.aux_loss_coef, bias_update_rate=config.moe.bias_update_rate,
                             schedule=schedule, preference=preference_of(config),
                             mtp_loss_weight=float(config.mtp.loss_weight) * (config.task != "dpo"),  # DPO: no MTP
                             seed=config.seed)
    shardings = (state_shardings, batch_sharding(mesh))
    if uses_reference_model(config):
        return jax.jit(lambda state, batch, reference: step(state, batch, reference=reference),
                       in_shardings=(*shardings, state_shardings.params),
                       out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
    return jax.jit(step, in_shardings=shardings, out_shardings=(state_shardings, replicated(mesh)),
                   donate_argnums=0)


def uses_reference_model(config: ml_collections.ConfigDict) -> bool:
    return config.task == "dpo" and config.dpo.reference == "model"


def preference_of(config: ml_collections.ConfigDict) -> Preference | None:
    """DPO's loss settings; None for the next-token tasks."""
    if config.task != "dpo":
        return None
    return Preference(config.dpo.beta, config.dpo.label_smoothing, config.dpo.sft_loss_weight)


class Trainer:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        _validate(config)
        self.config, self.workdir = config, workdir
        # One run per workdir; the lock is released when run() ends (or by the next run if this one dies).
        self.lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
        self.cfg = model_config(config)
        self.model = NemotronH(self.cfg)
        self.mesh = make_mesh(config.mesh)
        check_expert_mesh(self.mesh, self.cfg)
        self.schedule = learning_rate_schedule(config.optimizer, config.total_steps)
        self.optimizer = make_optimizer(config.optimizer, config.total_steps)
        self.checkpoints = TrainCheckpoints(workdir, config.keep_checkpoints)
        self._abstract_state()
        source = train_source(config, self.cfg, _say)
        self.eval_data = eval_batches(config, self.cfg)
        self.frozen = ()  # the step's and the evaluation's extra arguments: DPO's reference parameters
        if config.task == "dpo":
            reference = self._initial_params(fresh=False)
            if config.dpo.reference == "model":
                self.frozen = (reference,)
            else:
                source.arrays["reference_logps"] = self._reference_pass(reference, source.arrays)
                for batch in self.eval_data:
                    batch["reference_logps"] = self._reference_pass(reference, batch)
        self.iterator = batches(config, source)
        self.preempted = False

    # ----- state ---------------------------------------------------------------------------------
    def _abstract_state(self) -> None:
        self.abstract, self.state_shardings = abstract_train_state(self.model, self.optimizer, self.mesh)
        self.abstract_params, self.param_shardings = self.abstract.params, self.state_shardings.params
        self._init_opt = jax.jit(self.optimizer.init, in_shardings=(self.param_shardings,),
                                 out_shardings=self.state_shardings.opt_state)

    def _initial_params(self, fresh: bool = True):
        """init_from's weights; a fresh initialisation when there is none (and `fresh`)."""
        source = self.config.init_from
        if not source and fresh:
            tokens = jnp.zeros(smallest_batch(self.mesh), jnp.int32)
            init = jax.jit(lambda key: nn.unbox(self.model.init(key, tokens)["params"]),
                           out_shardings=self.param_shardings)
            key = jax.random.key(self.config.seed)
            # Runs once: on the CPU, LLVM's optimisation of its many RNG calls took longer than it saves
            # (tiny: 6.4 s -> 2.6 s to compile; the values agree to the last bit or two).
            options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
            return init.lower(key).compile(compiler_options=options)(key)
        check_same_architecture(source, read_checkpoint_config(source), self.cfg)
        return load_checkpoint_params(source, self.cfg, self.abstract_params)

    def _compiled(self, step_fn, state: TrainState, batch: dict):
        """The step compiled before its first run. Several processes then wait for each other at the
        coordination service's barrier: a process still compiling would otherwise leave the other's first
        collectives waiting, and gloo gives a new communicator 30 s."""
        with jax.set_mesh(self.mesh):
            compiled = step_fn.lower(state, batch, *self.frozen).compile()
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("nemojax: train step compiled", timeout=3600)
        return compiled

    def _start(self) -> tuple[TrainState, jax.Array]:
        """Resume from the newest checkpoint that restores (the ones that do not are moved aside), else
        start from init_from or a fresh initialisation."""
        moved = []
        for step in self.checkpoints.steps():
            try:
                changes = check_resume_config(step, self.checkpoints.saved_config(step), self.config)
                state, rng, iterator_state = self.checkpoints.restore(step, self.abstract)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: try the previous one
                moved.append(self.checkpoints.move_aside(step))
                _say(f"checkpoint {self.checkpoints.path(step)} cannot be restored ({error_summary(e)}); "
                     f"moved it to {moved[-1]}")
                continue
            self.iterator.set_state(iterator_state)
            _say(f"resuming from step {step} (checkpoint {self.checkpoints.path(step)})"
                 + (f"; changed: {', '.join(changes)}" if changes else ""))
            return state, rng
        if moved:
            raise TrainingError(f"no checkpoint in {self.workdir}/checkpoints restores; moved aside: "
                                f"{', '.join(moved)}. Rerun to start from step 0")
        # DPO against a reference model starts from the same init_from weights: a copy, not a second read.
        params = jax.tree.map(jnp.copy, self.frozen[0]) if self.frozen else self._initial_params()
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated(self.mesh))
        return TrainState(step, params, self._init_opt(params)), jax.random.key(self.config.seed)

    def _reference_pass(self, reference, windows: dict[str, np.ndarray]) -> np.ndarray:
        """DPO's precomputed reference: each window's per-segment reply log-probabilities under the
        init_from weights, computed once, batch by batch, before training."""
        fn = jax.jit(functools.partial(reply_logprobs, self.model))
        size, rows = self.config.batch_size, len(windows["tokens"])
        out = []
        with jax.set_mesh(self.mesh):
            for start in range(0, rows, size):
                part = {k: windows[k][start:start + size] for k in ("tokens", "mask", "segment_ids")}
                pad = size - len(part["tokens"])  # the last batch, padded to the compiled shape
                part = {k: np.concatenate([v, v[:1].repeat(pad, 0)]) for k, v in part.items()}
                out.append(np.asarray(fn(reference, *(jnp.asarray(part[k]) for k in
                                                           ("tokens", "mask", "segment_ids"))))[:size - pad])
        return np.concatenate(out)

    # ----- the loop ------------------------------------------------------------------------------
    def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        sharding = batch_sharding(self.mesh)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()
                if k in ("tokens", "mask", "segment_ids", "reference_logps")}

    def _evaluate(self, params) -> dict[str, float]:
        if not self.eval_data:
            return {}
        totals = eval_totals(self._eval_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, *self.frozen)
                             for batch in self.eval_data)
        return dpo_eval_metrics(totals) if self.config.task == "dpo" else eval_metrics(totals)

    def _on_sigterm(self, signum, frame) -> None:
        self.preempted = True

    def run(self) -> dict[str, Any]:
        """Train from the newest checkpoint (or the start) to `total_steps`; returns the final state and
        the last logged record."""
        config = self.config
        step_fn = jitted_train_step(config, self.model, self.optimizer, self.schedule, self.mesh,
                                    self.state_shardings)
        preference = preference_of(config)
        self._eval_fn = jax.jit(functools.partial(eval_sums, self.model) if preference is None else
                                functools.partial(dpo_eval_sums, self.model, preference))
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        with jax.set_mesh(self.mesh):
            state, rng = self._start()
        start = int(state.step)
        writer = MetricsWriter(self.workdir, start, config.total_steps, enabled=jax.process_index() == 0)
        flops = train_flops(self.cfg, config.batch_size, config.seq_len, with_mtp=config.mtp.loss_weight > 0)
        log = StepLog(writer, config.log_every, config.total_steps, self.cfg.hybrid_override_pattern,
                      config.batch_size * config.seq_len, flops, device_peak_flops(config.peak_flops_per_device))
        _say(f"compiling the train step ({self.cfg.num_hidden_layers} layers, {config.batch_size} x "
             f"{config.seq_len} tokens per step) ...")
        try:
            for step in range(start + 1, config.total_steps + 1):
                batch = self._device_batch(next(self.iterator))
                if step == start + 1:
                    step_fn = self._compiled(step_fn, state, batch)
                with jax.set_mesh(self.mesh):
                    state, metrics = step_fn(state, batch, *self.frozen)
                log.add(step, metrics)
                if step == start + 1:  # the compiling step: throughput is timed from its end
                    jax.block_until_ready(state)
                    log.start_clock(step)
                is_last = step == config.total_steps
                if config.eval_every and step % config.eval_every == 0 or is_last and self.eval_data:
                    jax.block_until_ready(state)
                    began = time.perf_counter()
                    results = self._evaluate(state.params)
                    log.add_eval(step, results, time.perf_counter() - began)
                save = step % config.checkpoint_every == 0 or is_last or self.preempted
                if save or step % config.log_every == 0 or step in log.evals:
                    self._flush(log, step)
                if save:
                    self.checkpoints.save(step, state, rng, self.iterator.get_state(), config.to_dict(), self.cfg)
                if self.preempted:
                    self.checkpoints.wait()
                    writer.message(f"SIGTERM: saved a checkpoint at step {step}; exiting")
                    raise Preempted(step)
            self._flush(log, config.total_steps)
        finally:
            self.checkpoints.wait()
            self.checkpoints.close()
            writer.close()
            signal.signal(signal.SIGTERM, previous_handler)
            if self.lock:
                self.lock.release()
        return {"state": state, "last": log.last}

    def _flush(self, log: StepLog, step: int) -> None:
        try:
            log.flush(step)
        except NonFiniteLoss as e:
            raise TrainingError(f"{e}: stopping; the last checkpoint (step {self.checkpoints.latest_step()}) "
                                "is untouched") from None
