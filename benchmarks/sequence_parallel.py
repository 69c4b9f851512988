"""What splitting sequences costs: the train step of configs/tiny.py on 4 simulated CPU devices, with the
same global tokens per step, as data parallelism (data=4: each device whole sequences) and as sequence
parallelism (sequence=4: each device a quarter of every sequence, exchanging SSD states, conv halos and
attention keys/values), plus sequence=4 for one sequence 4x as long. Prints the median step time of
paired, interleaved runs and each step's compiled per-device temporary memory.

    python -m benchmarks.sequence_parallel [--seq-len 2048] [--batch 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from nemojax.model import NemotronH  # noqa: E402
from nemojax.sharding import batch_sharding, make_mesh, smallest_batch  # noqa: E402
from nemojax.train.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from nemojax.train.step import TrainState  # noqa: E402
from nemojax.train.trainer import abstract_train_state, jitted_train_step, model_config  # noqa: E402


def prepared_step(mesh_sizes: dict[str, int], batch: int, seq_len: int):
    """(run one step, the compiled step's per-device temporary bytes) for tiny on `mesh_sizes`."""
    config = tiny.get_config()
    config.batch_size, config.seq_len, config.dtype = batch, seq_len, "float32"
    config.mesh.update({"data": 1, **mesh_sizes})
    cfg = model_config(config)
    model, mesh = NemotronH(cfg), make_mesh(config.mesh)
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    abstract, shardings = abstract_train_state(model, optimizer, mesh)
    with jax.set_mesh(mesh):
        init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros(smallest_batch(mesh), jnp.int32))["params"]),
                       out_shardings=shardings.params)
        params = init(jax.random.key(0))
        opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
        state = [TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)]
        step = jitted_train_step(config, model, optimizer, learning_rate_schedule(config.optimizer, 600), mesh,
                                 shardings)
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
        data = jax.device_put({"tokens": tokens, "mask": np.ones(tokens.shape, bool)}, batch_sharding(mesh))
        compiled = step.lower(abstract, data).compile()

    def run() -> float:
        start = time.perf_counter()
        with jax.set_mesh(mesh):
            state[0], metrics = compiled(state[0], data)
            jax.block_until_ready(metrics)
        return time.perf_counter() - start

    return run, compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    b, n = args.batch, args.seq_len
    cases = {f"data=4, {b} x {n}": ({"data": 4}, b, n),
             f"sequence=4, {b} x {n}": ({"sequence": 4}, b, n),
             f"sequence=4, {b // 4} x {4 * n}": ({"sequence": 4}, b // 4, 4 * n)}
    prepared = {name: prepared_step(*case) for name, case in cases.items()}
    times = {name: [] for name in cases}
    for _ in range(2):  # warm-up
        for run, _ in prepared.values():
            run()
    for _ in range(args.repeats):  # interleaved: a noisy moment hits every case alike
        for name, (run, _) in prepared.items():
            times[name].append(run())
    base = statistics.median(times[next(iter(cases))])
    print(f"tiny, {b * n} tokens per step, 4 simulated CPU devices on {os.cpu_count()} cores, "
          f"median of {args.repeats} interleaved steps")
    for name, (_, temp) in prepared.items():
        median = statistics.median(times[name])
        print(f"  {name:28s} {median * 1e3:8.1f} ms/step  ({median / base:4.2f}x data=4)  "
              f"temp {temp / 2**20:7.1f} MiB/device")


if __name__ == "__main__":
    main()
