"""The tiny model trained with each low-precision recipe for the same steps (train.py, one run after another,
same seed and data): final losses, the gaps between recipes, and tokens per second (median of the logged).

    python -m benchmarks.precision [--recipes bf16,fp8,nvfp4] [--steps 600] [--root /tmp/nemojax-precision]

"bf16" is the unquantized baseline (tiny computes in fp32 on the CPU). On the CPU every format is
simulated (quantize, dequantize, fp32 GEMM), so its throughput shows the simulation's cost, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(recipe: str, steps: int, root: str) -> dict:
    workdir = os.path.join(root, recipe)
    command = [sys.executable, os.path.join(REPO, "train.py"), f"--config={REPO}/configs/tiny.py",
               f"--workdir={workdir}", f"--config.precision={recipe}", f"--config.total_steps={steps}",
               f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}"]
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wall = time.time() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    rates = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]  # compile and eval excluded
    return {"first": train_losses[0], "last": statistics.mean(train_losses[-5:]), "eval": evals[-1]["eval_loss"],
            "tokens_s": statistics.median(rates), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="bf16,fp8,nvfp4")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--root", default="/tmp/nemojax-precision")
    args = parser.parse_args()
    results = {recipe: train(recipe, args.steps, args.root) for recipe in args.recipes.split(",")}
    base = results.get("bf16")
    print(f"tiny, {args.steps} steps: loss at the first logged step -> mean of the last 5 logged; held-out loss")
    print(f"{'recipe':8} {'first':>7} {'last':>7} {'eval':>7} {'eval gap vs bf16':>17} {'tokens/s':>9} {'wall s':>7}")
    for recipe, r in results.items():
        gap = f"{100 * (r['eval'] / base['eval'] - 1):+.2f}%" if base else "-"
        print(f"{recipe:8} {r['first']:7.4f} {r['last']:7.4f} {r['eval']:7.4f} {gap:>17} {r['tokens_s']:9.0f} "
              f"{r['wall_s']:7.1f}")
    if "fp8" in results and "nvfp4" in results:
        print(f"nvfp4 vs fp8 held-out loss: {100 * (results['nvfp4']['eval'] / results['fp8']['eval'] - 1):+.2f}%")


if __name__ == "__main__":
    main()
