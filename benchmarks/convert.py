"""Converter throughput on a generated checkpoint (random fp32 tensors in the Hub layout, several shards).

Prints MB/s of checkpoint converted for hf-to-orbax (fp32 -> bf16, as a user converting for training
would) and orbax-to-hf, medians of several runs, next to this disk's plain copy rate (the ceiling).

    python -m benchmarks.convert [--layers 20] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from nemojax.checkpoint.conversion import hf_to_orbax, orbax_to_hf
from tests.test_convert import write_random_checkpoint


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20, help="Mamba + MLP pairs (about 34 MB each, fp32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    fields = dict(hybrid_override_pattern="M-" * args.layers, vocab_size=8192, hidden_size=1024,
                  num_attention_heads=8, num_key_value_heads=8, head_dim=128, intermediate_size=4096,
                  mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=8)
    work = tempfile.mkdtemp(dir=args.dir)
    try:
        src = os.path.join(work, "hf")
        size = write_random_checkpoint(src, fields, shards=8)
        mb = size / 1e6
        copies, to_orbax, to_hf = [], [], []
        for i in range(args.repeats):
            copies.append(timed(lambda: shutil.copytree(src, os.path.join(work, f"copy{i}"))))
            to_orbax.append(timed(lambda: hf_to_orbax(src, os.path.join(work, f"orbax{i}"), "bfloat16")))
            to_hf.append(timed(lambda: orbax_to_hf(os.path.join(work, f"orbax{i}"), os.path.join(work, f"back{i}"))))
            for name in (f"copy{i}", f"back{i}"):
                shutil.rmtree(os.path.join(work, name))
            if i:
                shutil.rmtree(os.path.join(work, f"orbax{i}"))
        print(f"checkpoint: {mb:.0f} MB fp32 in 8 shards, {args.layers * 2} layers; medians of {args.repeats}")
        print(f"  disk copy (ceiling)          {mb / statistics.median(copies):7.0f} MB/s")
        print(f"  hf-to-orbax (fp32 -> bf16)   {mb / statistics.median(to_orbax):7.0f} MB/s of fp32 input")
        print(f"  orbax-to-hf (bf16)           {mb / 2 / statistics.median(to_hf):7.0f} MB/s of bf16 output")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
