"""Steady-state training step of the `small` hybrid (configs/small.py): forward, backward, AdamW update.

Prints the median step time and its model FLOP/s (nemojax.flops.train_flops) next to the measured rate
of a large jitted matmul on the same machine (the ceiling).

    python -m benchmarks.train_step [--repeats 5] [--batch 1] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import matmul_flops_per_second, median_seconds
from configs import small
from nemojax.config import ModelConfig
from nemojax.flops import train_flops
from nemojax.hostmem import reexec_with_huge_pages
from nemojax.model import NemotronH
from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
from nemojax.train.step import TrainState, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    config = small.get_config()
    cfg = ModelConfig.from_hf(config.model.to_dict(), param_dtype=config.param_dtype, dtype=config.dtype)
    model = NemotronH(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "mask": jnp.ones(tokens.shape, bool)}
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch["tokens"][:, :8])["params"])
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    step = jax.jit(functools.partial(train_step, model, optimizer, grad_accum_steps=1, aux_loss_coef=0.0,
                                     bias_update_rate=0.0, schedule=schedule), donate_argnums=0)
    state = [TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))]

    def one_step():
        state[0], metrics = step(state[0], batch)
        jax.block_until_ready(metrics)

    ceiling_before = matmul_flops_per_second()
    seconds = median_seconds(one_step, args.repeats, warmup=2)
    ceiling = max(ceiling_before, matmul_flops_per_second())
    flops = train_flops(cfg, args.batch, args.seq_len)
    print(f"small hybrid train step: {sum(p.size for p in jax.tree.leaves(params)) / 1e6:.1f}M parameters, "
          f"{args.batch} x {args.seq_len} tokens, {flops / 1e9:.0f} GFLOP; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"matmul ceiling (jitted 2048^3 fp32, best of before/after): {ceiling / 1e9:.1f} GFLOP/s")
    print(f"step: median {seconds:.3f} s of {args.repeats}, {flops / seconds / 1e9:.1f} GFLOP/s = "
          f"{flops / seconds / ceiling:.0%} of the ceiling, {args.batch * args.seq_len / seconds:.0f} tokens/s")


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py does (nemojax/hostmem.py)
    main()
