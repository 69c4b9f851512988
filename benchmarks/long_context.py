"""Where a model trained at one length breaks at longer ones: the synthetic language's held-out recall
(next-token loss and key-value recall accuracy) and RULER-style tasks at growing lengths, one row per
length, for each checkpoint given (e.g. configs/tiny.py trained at --config.seq_len=128 and 512).

    python train.py --config configs/tiny.py --workdir /tmp/t128
    python train.py --config configs/tiny.py --workdir /tmp/t512 --config.seq_len=512 --config.batch_size=2
    python -m benchmarks.long_context /tmp/t128/checkpoints/600 /tmp/t512/checkpoints/600 \\
        [--lengths 128,256,512,1024,2048,4096] [--sequences 32] [--ruler_samples 4] [--prefill_chunk 512]
"""

from __future__ import annotations

import argparse

from nemojax import evaluation
from nemojax.checkpoint.loading import load_model
from nemojax.ruler import parse_lengths
from nemojax.tokenizer import Tokenizer

RULER_TASKS = ("niah_single", "variable_tracking", "common_words")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    parser.add_argument("--sequences", type=int, default=32, help="held-out recall sequences per length")
    parser.add_argument("--ruler_samples", type=int, default=4, help="RULER examples per task and length (0: none)")
    parser.add_argument("--prefill_chunk", type=int, default=512)
    args = parser.parse_args()
    lengths = parse_lengths(args.lengths)
    for path in args.checkpoints:
        cfg, params, training = load_model(path)
        trained = (training or {}).get("seq_len", "?")
        seed = (training or {}).get("data", {}).get("shuffle_seed", 0)
        print(f"{path} (trained on {trained}-token sequences)")
        print(f"  {'length':>7} {'loss':>7} {'recall':>7}" + "".join(f" {t:>18}" for t in RULER_TASKS))
        for length in lengths:
            recall = evaluation.recall(cfg, params, args.sequences, length, seed, batch_size=4)
            row = f"  {length:>7} {recall['loss']:7.3f} {recall['recall_accuracy']:7.3f}"
            if args.ruler_samples and length >= 256:  # shorter prompts cannot hold a haystack
                scores = evaluation.ruler(cfg, params, Tokenizer(), [length], RULER_TASKS, args.ruler_samples,
                                          prefill_chunk=args.prefill_chunk)
                row += "".join(f" {scores[f'{length}/{t}']:18.2f}" for t in RULER_TASKS)
            print(row, flush=True)


if __name__ == "__main__":
    main()
