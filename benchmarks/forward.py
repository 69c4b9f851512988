"""Forward and forward+backward of the `small` hybrid (~110M) on 2048 tokens: transformers vs nemojax.

Both run in this process on the same weights (transformers saves them, nemojax.load_hf reads them).
Forward returns the full logits; forward+backward is each library's training loss and its gradient
(nemojax: the fused LM-head cross-entropy; transformers: logits, then its loss).
Prints medians and each one's model FLOP/s next to the rate of a large jitted matmul (the ceiling).

    python -m benchmarks.forward [--tokens 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import nemojax
from benchmarks.common import matmul_flops_per_second, median_seconds
from configs import small
from nemojax.flops import forward_flops
from nemojax.hostmem import reexec_with_huge_pages
from nemojax.loss import lm_head_loss

SMALL = small.get_config().model.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true", help="time nemojax only")
    args = parser.parse_args()

    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    hf_model = NemotronHForCausalLM(NemotronHConfig(**SMALL)).eval()
    hf_model.config._experts_implementation = "eager"
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        cfg, params = nemojax.load_hf(tmp)
    n_params = sum(p.numel() for p in hf_model.parameters())
    ids_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.tokens)).astype(np.int32)
    flops = forward_flops(cfg, 1, args.tokens)

    ceiling_before = matmul_flops_per_second()
    print(f"small hybrid: {n_params / 1e6:.1f}M parameters, {args.tokens} tokens, "
          f"{flops / 1e9:.1f} GFLOP forward; {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"torch threads {torch.get_num_threads()}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")

    model = nemojax.NemotronH(cfg)
    ids = jnp.asarray(ids_np)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    def training_loss(p, x):  # hidden states through the fused LM-head cross-entropy, as train_step does
        hidden = model.apply({"params": p}, x, method="hidden")
        return lm_head_loss(hidden, model.apply({"params": p}, method="head_weight").astype(hidden.dtype), x)

    grad = jax.jit(jax.value_and_grad(training_loss))
    results = {
        "nemojax forward": median_seconds(lambda: fwd(params, ids).block_until_ready(), args.repeats),
        "nemojax forward+backward": median_seconds(
            lambda: jax.block_until_ready(grad(params, ids)), args.repeats),
    }
    if not args.skip_torch:
        t_ids = torch.as_tensor(ids_np, dtype=torch.long)

        def torch_forward():
            with torch.no_grad():
                hf_model(t_ids)

        def torch_backward():
            hf_model.zero_grad(set_to_none=True)
            hf_model(t_ids, labels=t_ids).loss.backward()

        results["transformers forward"] = median_seconds(torch_forward, args.repeats)
        results["transformers forward+backward"] = median_seconds(torch_backward, args.repeats)

    # The machine is shared: take the better of two ceiling readings, so "of ceiling" is conservative.
    ceiling = max(ceiling_before, matmul_flops_per_second())
    print(f"matmul ceiling (jitted 2048^3 fp32, best of before/after): {ceiling / 1e9:.1f} GFLOP/s -> floors: "
          f"forward {flops / ceiling:.2f} s, forward+backward {3 * flops / ceiling:.2f} s")
    print(f"{'':32s} {'median s':>9s} {'GFLOP/s':>9s} {'of ceiling':>10s}")
    for name, seconds in results.items():
        work = flops * (3 if "backward" in name else 1)
        print(f"{name:32s} {seconds:9.3f} {work / seconds / 1e9:9.1f} {work / seconds / ceiling:9.0%}")
    if not args.skip_torch:
        for part in ("forward", "forward+backward"):
            speedup = results[f"transformers {part}"] / results[f"nemojax {part}"]
            print(f"speed-up over transformers, {part}: {speedup:.2f}x")


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py does (nemojax/hostmem.py)
    main()
