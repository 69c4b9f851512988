"""How long a released model's train step takes to lower and compile, with and without layer scanning.

The step is traced from abstract parameters (nothing is allocated), for one device of this machine, with
the config's own runtime choices (bf16 compute, remat) and `ssm_impl=xla`, so it measures the depth of
the program rather than a kernel. Compile time grows with every unrolled block; with
`scan_layers=True` each repeated group of blocks is compiled once.

    python -m benchmarks.compile_time --config configs/nemotron_h_8b.py [--scan both|on|off] [--seq-len 4096]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import time

import jax
import jax.numpy as jnp

from nemojax.checkpoint.loading import abstract_params
from nemojax.model import NemotronH
from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
from nemojax.train.step import TrainState, train_step
from nemojax.train.trainer import model_config


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def compile_seconds(config, scan: bool, batch: int, seq_len: int) -> dict:
    config.scan_layers = scan
    config.ssm_impl = config.attention_impl = "xla"
    cfg = model_config(config)
    model = NemotronH(cfg)
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    params = abstract_params(cfg)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(optimizer.init, params))
    data = {"tokens": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)}
    step = jax.jit(functools.partial(train_step, model, optimizer, grad_accum_steps=1,
                                     aux_loss_coef=config.moe.aux_loss_coef,
                                     bias_update_rate=config.moe.bias_update_rate, schedule=schedule),
                   donate_argnums=0)
    start = time.perf_counter()
    lowered = step.lower(state, data)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    return dict(layers=cfg.num_hidden_layers, scan_layers=scan, lower_s=round(lower_s, 1),
                compile_s=round(compile_s, 1), total_s=round(lower_s + compile_s, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--scan", choices=("both", "on", "off"), default="both")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    for scan in {"both": (False, True), "on": (True,), "off": (False,)}[args.scan]:
        row = compile_seconds(load_config(args.config), scan, args.batch, args.seq_len)
        print(json.dumps(dict(config=args.config, device=jax.devices()[0].platform, **row)), flush=True)


if __name__ == "__main__":
    main()
