"""Where training numbers go: tensorboardX scalars, WORKDIR/metrics.jsonl (one JSON object per logged
step), and a progress bar with ETA on the console."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from nemojax.scan_layers import layer_name
from nemojax.train.dpo import METRICS as DPO_METRICS

# Dense bf16 peak FLOP/s per device, by `jax.Device.device_kind` prefix (vendor data sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA H20": 148e12, "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12, "NVIDIA GB200": 2500e12, "NVIDIA A100": 312e12,
}


def expert_load_imbalance(counts: dict[str, Any], pattern: str) -> dict[str, float]:
    """{layers_i (or mtp/layers_j): max / mean expert load} from the train step's counts (stacked for
    scanned runs); backbone layers first, in order."""
    out = {}
    for block, count in counts.items():
        count = np.asarray(count)
        rows = [(block, count)] if count.ndim == 1 else [(layer_name(block, r, pattern), c) for r, c in
                                                         enumerate(count)]
        for layer, c in rows:
            out[layer] = float(np.max(c) / max(np.mean(c), 1e-9))
    return dict(sorted(out.items(), key=lambda item: (item[0].startswith("mtp/"), int(item[0].rsplit("_", 1)[1]))))


def device_peak_flops(configured: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the configured value, else looked up from the device kind."""
    if configured:
        return configured
    kind = jax.devices()[0].device_kind
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep the records of steps <= last_step (a resumed run rewrites the rest); drops a torn last line."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", math.inf) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, workdir: str, start_step: int, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if not enabled:
            return
        truncate_jsonl(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a")
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
        self.progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    self.tensorboard.add_scalar(f"{key}/{sub}", v, step)
            elif key != "step":
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def advance(self, steps: int) -> None:
        if self.enabled:
            self.progress.update(steps)

    def message(self, text: str) -> None:
        if self.enabled:
            self.progress.write(text)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
            self.progress.close()


class NonFiniteLoss(ArithmeticError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"non-finite loss {loss} at step {step}")
        self.step, self.loss = step, loss


class StepLog:
    """The train loop's metrics: each step's device values are kept until a flush fetches them all at once
    (so the host never waits on a step), then the logged steps are written with the throughput measured
    since the previous flush. Compilation (the first step) and evaluation are not counted as training time.
    """

    def __init__(self, writer: MetricsWriter, log_every: int, total_steps: int, pattern: str,
                 tokens_per_step: int, flops_per_step: float, peak_flops: float | None):
        self.writer, self.log_every, self.total_steps, self.pattern = writer, log_every, total_steps, pattern
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.pending: list[tuple[int, Any]] = []
        self.evals: dict[int, dict] = {}
        self.clock: tuple[float, int] | None = None  # (time, step) of the last flush after compilation
        self.last: dict[str, Any] = {}

    def add(self, step: int, metrics: Any) -> None:
        self.pending.append((step, metrics))
        self.writer.advance(1)

    def start_clock(self, step: int) -> None:
        """`step` (the compiling one) has finished: time from here."""
        self.clock = (time.perf_counter(), step)

    def add_eval(self, step: int, results: dict, seconds: float) -> None:
        self.evals[step] = results
        if self.clock is not None:
            self.clock = (self.clock[0] + seconds, self.clock[1])

    def _rates(self, step: int) -> tuple[dict, int]:
        """Throughput over the steps after the clock's step, and that step."""
        if self.clock is None or step <= self.clock[1]:
            return {}, step
        seconds = (time.perf_counter() - self.clock[0]) / (step - self.clock[1])
        rates = {"tokens_per_second": self.tokens_per_step / seconds,
                 "model_flops_per_second": self.flops_per_step / seconds}
        if self.peak_flops:
            rates["mfu"] = self.flops_per_step / seconds / (self.peak_flops * jax.device_count())
        return rates, self.clock[1]

    def flush(self, step: int) -> None:
        """Fetch the pending steps, refuse a non-finite loss (`NonFiniteLoss`), write the logged ones."""
        fetched = jax.device_get(self.pending)
        self.pending.clear()
        rates, measured_after = self._rates(step)
        self.clock = (time.perf_counter(), step) if self.clock is not None else None
        for s, metrics in fetched:
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(s, loss)
            if s % self.log_every and s not in (1, self.total_steps) and s not in self.evals:
                continue
            record = {"loss": loss, "learning_rate": float(metrics["learning_rate"]),
                      "grad_norm": float(metrics["grad_norm"]), **(rates if s > measured_after else {})}
            if "expert_counts" in metrics:
                record["balance_loss"] = float(metrics["balance_loss"])
                record["expert_load_max_over_mean"] = expert_load_imbalance(metrics["expert_counts"], self.pattern)
            record.update({k: float(metrics[k]) for k in DPO_METRICS if k in metrics})
            for depth, value in enumerate(metrics.get("mtp_loss", ()), start=1):
                record[f"mtp_loss_depth_{depth}"] = float(value)
            record.update(self.evals.pop(s, {}))
            self.writer.write(s, record)
            self.last = record
