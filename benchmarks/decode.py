"""Per-token decode latency of the `small` hybrid (~110M), against the weight-streaming floor and
against transformers' `generate` on the same weights, in one process.

A decode step of one sequence reads every weight once (the embedding aside: one row), so its floor
is (weight bytes) / (the rate at which a large jitted matrix-vector product streams its matrix).
nemojax: the prompt is prefilled once, then `generate`'s own decode loop (`decode_tokens`) is timed
for N tokens. transformers: (time of generate(N2 tokens) - time of generate(N1)) / (N2 - N1), so its
prefill cancels (at 256 tokens of context, where prefill is short enough not to drown the difference).

    python -m benchmarks.decode [--contexts 256,2048,8192] [--batch 16] [--repeats 3] [--skip-torch]

Speculative decoding (`--speculative K`) times `generate` itself, batch 1, with and without K drafts per
backbone call from a trained MTP model (configs/small_mtp.py; its docstring has the recipe), on prompts
from the synthetic language; prefill cancels as above (N2 - N1 tokens), and the runs are paired:

    python -m benchmarks.decode --speculative 3 --mtp_checkpoint /tmp/small_mtp
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import nemojax
from benchmarks.common import median_seconds
from configs import small
from nemojax.generate import Sampling, decode_tokens
from nemojax.hostmem import reexec_with_huge_pages

SMALL = small.get_config().model.to_dict()
N1, N2 = 8, 72  # transformers: tokens generated in the short and the long run
N = 64  # nemojax: tokens per timed decode loop


def matvec_bytes_per_second(repeats: int = 7) -> float:
    """Streaming rate of a jitted fp32 matrix-vector product over a 256 MB matrix: the best median of
    two shapes and both orientations (the fastest reading makes the most demanding floor)."""
    best = 0.0
    for rows, cols in ((8192, 8192), (4096, 16384)):
        w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
        products = ((jax.jit(lambda w, v: w @ v), jnp.ones((cols,))), (jax.jit(lambda w, v: v @ w), jnp.ones((rows,))))
        for f, v in products:
            seconds = median_seconds(lambda: f(w, v).block_until_ready(), repeats=repeats, warmup=2)
            best = max(best, w.nbytes / seconds)
    return best


def per_token_seconds(run, repeats: int) -> float:
    """(median time of run(N2) - median time of run(N1)) / (N2 - N1)."""
    long_run = median_seconds(lambda: run(N2), repeats)
    short_run = median_seconds(lambda: run(N1), repeats)
    return (long_run - short_run) / (N2 - N1)


def speculative(checkpoint: str, k: int, pairs: int, repeats: int) -> None:
    """Mean accepted length and tokens/s with k drafts against plain decoding, batch 1, same process."""
    from nemojax.checkpoint.loading import load_model
    from nemojax.data.synthetic import synthetic_example
    from nemojax.layers.common import Decoding

    cfg, params, _ = load_model(checkpoint)
    if not cfg.num_nextn_predict_layers:
        raise SystemExit(f"{checkpoint}: the model has no MTP layers (train configs/small_mtp.py)")
    prompts = [synthetic_example(seed=12345, index=i, seq_len=64)["tokens"][:48].tolist() for i in range(4)]
    short, long_ = 16, 144

    def run(prompt, n, drafts):
        return nemojax.generate(cfg, params, [prompt], n, speculative_tokens=drafts, stop_tokens=(),
                                return_stats=True)

    def per_token(prompt, drafts) -> float:
        return (median_seconds(lambda: run(prompt, long_, drafts), repeats)
                - median_seconds(lambda: run(prompt, short, drafts), repeats)) / (long_ - short)

    lengths = []
    for prompt in prompts:
        plain, _ = run(prompt, long_, 0)
        speculated, stats = run(prompt, long_, k)
        assert speculated == plain, "speculative greedy decoding changed the tokens"
        lengths.append(stats.mean_accepted_length)
    print(f"{checkpoint}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M parameters, MTP pattern "
          f"{cfg.mtp_hybrid_override_pattern!r}; k = {k}; greedy, batch 1, {long_} new tokens after 48")
    print(f"mean accepted length (tokens per backbone call) per prompt: {' '.join(f'{x:.2f}' for x in lengths)}; "
          f"median {np.median(lengths):.2f}")

    # What one backbone call over k + 1 positions costs against one over a single position, here.
    model = nemojax.NemotronH(cfg)
    lengths_ = jnp.array([48])
    ids = jnp.asarray([prompts[0]], jnp.int32)
    _, cache = model.apply({"params": params}, ids, Decoding(lengths_, prefill=True, max_new_tokens=64,
                                                             slots=k + 1), method="hidden", mutable=["cache"])
    call = jax.jit(lambda tokens: model.apply({"params": params, "cache": cache["cache"]}, tokens,
                                              Decoding(lengths_, jnp.array([3]), 0, max_new_tokens=64, slots=k + 1),
                                              method="hidden", mutable=["cache"]))
    one, several = (median_seconds(lambda t=t: jax.block_until_ready(call(jnp.ones((1, t), jnp.int32))), 7, 2)
                    for t in (1, k + 1))
    print(f"one backbone call: 1 position {one * 1e3:.2f} ms, {k + 1} positions {several * 1e3:.2f} ms "
          f"({several / one:.2f}x)")

    ratios = []
    for i in range(pairs):
        prompt = prompts[i % len(prompts)]
        plain_s, spec_s = per_token(prompt, 0), per_token(prompt, k)
        ratios.append(plain_s / spec_s)
        print(f"pair {i}: plain {plain_s * 1e3:.2f} ms/token ({1 / plain_s:.1f} tokens/s), speculative "
              f"{spec_s * 1e3:.2f} ms/token ({1 / spec_s:.1f} tokens/s): {plain_s / spec_s:.2f}x")
    print(f"speculative / plain tokens/s, median of {pairs} pairs: {np.median(ratios):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="256,2048,8192")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=5, help="paired (matvec, decode) readings for the floor ratio")
    parser.add_argument("--skip-torch", action="store_true", help="time nemojax only")
    parser.add_argument("--speculative", type=int, default=0, help="k: time speculative decoding instead")
    parser.add_argument("--mtp_checkpoint", default="", help="a trained MTP model (configs/small_mtp.py)")
    args = parser.parse_args()
    if args.speculative:
        if not args.mtp_checkpoint:
            parser.error("--speculative needs --mtp_checkpoint (train configs/small_mtp.py, see its docstring)")
        return speculative(args.mtp_checkpoint, args.speculative, args.pairs, args.repeats)
    contexts = [int(c) for c in args.contexts.split(",")]

    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    hf_model = NemotronHForCausalLM(NemotronHConfig(**SMALL)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        cfg, params = nemojax.load_hf(tmp)
    rng = np.random.default_rng(0)

    def prompts(batch, context):
        return rng.integers(3, cfg.vocab_size, (batch, context)).tolist()

    model = nemojax.NemotronH(cfg)
    prefill = jax.jit(lambda ids, lengths: model.apply({"params": params}, ids, lengths, N, method="prefill",
                                                       mutable=["cache"]))
    decode = jax.jit(functools.partial(decode_tokens, cfg, max_new_tokens=N, sampling=Sampling(), stops=(),
                                       thinking=None))

    def decode_loop(batch_prompts):
        """A call of `generate`'s decode loop for N tokens after these prompts' prefill."""
        ids, lengths = jnp.asarray(batch_prompts, jnp.int32), jnp.full((len(batch_prompts),), len(batch_prompts[0]))
        logits, cache = prefill(ids, lengths)
        no_thought, limits = jnp.zeros(lengths.shape, bool), jnp.zeros((2,), jnp.int32)
        return lambda: decode(params, cache["cache"], logits, lengths, no_thought, limits,
                              jax.random.key(0)).block_until_ready()

    def ours(batch_prompts) -> float:
        """Seconds per decoding step (one token per row)."""
        return median_seconds(decode_loop(batch_prompts), args.repeats) / N

    def theirs(batch_prompts):
        ids = torch.tensor(batch_prompts)

        def run(n):
            with torch.no_grad():
                hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return run

    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    streamed = total - params["embed"].nbytes + params["embed"].nbytes // cfg.vocab_size
    bandwidth = matvec_bytes_per_second()
    floor = streamed / bandwidth  # re-measured at the end; the higher reading is kept
    print(f"small hybrid, fp32: {total / 1e6:.0f} MB of weights, {streamed / 1e6:.0f} MB read per decode step; "
          f"matvec streams {bandwidth / 1e9:.1f} GB/s -> floor {floor * 1e3:.2f} ms/token; "
          f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
    print(f"{'':28s} {'ms/token':>9s} {'tokens/s':>9s} {'x floor':>8s}")

    def report(name, seconds, batch):
        print(f"{name:28s} {seconds * 1e3:9.2f} {batch / seconds:9.1f} {seconds / floor:8.2f}")

    latency = {}
    for context in contexts:
        latency[context] = ours(prompts(1, context))
        report(f"nemojax batch 1, ctx {context}", latency[context], 1)
    if len(contexts) > 1:
        ratio = latency[contexts[-1]] / latency[contexts[0]]
        print(f"latency ratio ctx {contexts[-1]} / ctx {contexts[0]}: {ratio:.2f}")
    batch_prompts = prompts(args.batch, contexts[0])
    ours_batch = ours(batch_prompts)
    report(f"nemojax batch {args.batch}, ctx {contexts[0]}", ours_batch, args.batch)
    if not args.skip_torch:
        single = per_token_seconds(theirs(prompts(1, contexts[0])), args.repeats)
        report(f"transformers batch 1, ctx {contexts[0]}", single, 1)
        theirs_batch = per_token_seconds(theirs(batch_prompts), args.repeats)
        report(f"transformers batch {args.batch}, ctx {contexts[0]}", theirs_batch, args.batch)
        print(f"speed-up over transformers: batch 1 {single / latency[contexts[0]]:.2f}x, "
              f"batch {args.batch} {theirs_batch / ours_batch:.2f}x")
    # The machine's speed drifts between the readings above: pair each decode timing with a matvec
    # reading taken right before it, and report the median of the per-pair ratios.
    run = decode_loop(prompts(1, contexts[0]))
    ratios = []
    for _ in range(args.pairs):
        rate = matvec_bytes_per_second(repeats=5)
        ratios.append(median_seconds(run, args.repeats) / N * rate / streamed)
    print(f"paired readings, batch 1 ctx {contexts[0]} / floor: {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {np.median(ratios):.2f}")


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py does (nemojax/hostmem.py)
    main()
