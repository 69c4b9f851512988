"""SFT and DPO steps of the `small` hybrid (configs/small.py) next to a pretraining step, same process.

SFT windows are packed generated conversations (segment ids, loss on the assistant's tokens); a DPO window
packs whole (chosen, rejected) pairs and runs the frozen reference model too. Steps alternate (pretrain,
SFT, DPO, ...), so machine noise hits all three alike; medians are printed.

    python -m benchmarks.posttrain [--repeats 5] [--batch 1] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import small
from nemojax.config import ModelConfig
from nemojax.data.packing import pack
from nemojax.data.chat import ChatEncoder
from nemojax.data.synthetic_chat import END_OF_TURN, TEMPLATE, conversation, pair
from nemojax.hostmem import reexec_with_huge_pages
from nemojax.model import NemotronH
from nemojax.tokenizer import Tokenizer
from nemojax.train.dpo import Preference
from nemojax.train.optimizer import learning_rate_schedule, make_optimizer
from nemojax.train.step import TrainState, train_step


def windows(units, seq_len: int, batch: int) -> tuple[dict, float]:
    """The first `batch` packed windows, and the fraction of all windows' positions real tokens fill."""
    arrays, stats = pack(units, seq_len, pad_id=0)
    return {k: jnp.asarray(v[:batch]) for k, v in arrays.items()}, stats.real_tokens / (stats.windows * seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    config = small.get_config()
    cfg = ModelConfig.from_hf(config.model.to_dict(), param_dtype=config.param_dtype, dtype=config.dtype)
    model = NemotronH(cfg)
    encoder = ChatEncoder(Tokenizer().with_template(TEMPLATE), end_of_turn=END_OF_TURN)
    count = args.batch * args.seq_len // 4  # ~20 windows: the fill is what a long run packs
    sft_batch, sft_fill = windows([[encoder.encode(conversation(0, i))] for i in range(count)], args.seq_len,
                                  args.batch)
    dpo_batch, dpo_fill = windows([list(encoder.encode_pair(pair(0, i))) for i in range(count)], args.seq_len,
                                  args.batch)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    pretrain_batch = {"tokens": jnp.asarray(tokens), "mask": jnp.ones(tokens.shape, bool)}

    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), pretrain_batch["tokens"][:, :8])["params"])
    reference = jax.tree.map(jnp.copy, params)
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    schedule = learning_rate_schedule(config.optimizer, config.total_steps)
    common = dict(grad_accum_steps=1, aux_loss_coef=0.0, bias_update_rate=0.0, schedule=schedule)
    lm_step = jax.jit(functools.partial(train_step, model, optimizer, **common), donate_argnums=0)
    dpo_step = jax.jit(lambda s, b, r: train_step(model, optimizer, s, b, preference=Preference(0.1), reference=r,
                                                  **common), donate_argnums=0)
    state = [TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))]
    runs = {"pretrain": lambda: lm_step(state[0], pretrain_batch), "sft": lambda: lm_step(state[0], sft_batch),
            "dpo": lambda: dpo_step(state[0], dpo_batch, reference)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for repeat in range(args.repeats + 1):  # the first round compiles
        for name, run in runs.items():
            start = time.perf_counter()
            state[0], metrics = run()
            jax.block_until_ready(metrics)
            if repeat:
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    window = args.batch * args.seq_len
    print(f"small hybrid, {args.batch} x {args.seq_len} tokens per step, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s); medians of {args.repeats} alternating steps")
    print(f"pretrain: {median['pretrain']:.3f} s, {window / median['pretrain']:.0f} tokens/s")
    print(f"sft:      {median['sft']:.3f} s, {window / median['sft']:.0f} tokens/s "
          f"({median['pretrain'] / median['sft']:.0%} of pretraining; windows {sft_fill:.0%} filled by conversations)")
    print(f"dpo:      {median['dpo']:.3f} s = {median['dpo'] / (2 * median['sft']):.2f} x two SFT steps "
          f"(policy forward + backward and the reference's forward over the same packed pairs; "
          f"windows {dpo_fill:.0%} filled)")


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py does (nemojax/hostmem.py)
    main()
