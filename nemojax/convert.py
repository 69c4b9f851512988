"""Convert checkpoints between the Hugging Face Hub layout and nemojax's Orbax layout, streaming.

    python -m nemojax.convert hf-to-orbax SRC DST [--dtype bfloat16] [--force]
    python -m nemojax.convert orbax-to-hf SRC DST [--max-shard-size 5GB] [--force]
        [--quantize fp8|nvfp4 [--calibration-data synthetic|GLOBS] [--calibration-batches 8]]

The conversion itself is `nemojax/checkpoint/conversion.py`; this is its command line.
"""

from __future__ import annotations

import argparse
import re
import sys

from nemojax.checkpoint.conversion import Quantize, hf_to_orbax, orbax_to_hf
from nemojax.checkpoint.hf import CheckpointError
from nemojax.config import ConfigError
from nemojax.data.sources import DataError

# ----- command line --------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes from "5GB", "5G", "500MB", "2GiB" or a plain count (decimal units, as transformers reads them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB, 2GiB or a byte count, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nemojax-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_orbax = commands.add_parser("hf-to-orbax", help="HF checkpoint directory -> Orbax checkpoint")
    to_orbax.add_argument("src")
    to_orbax.add_argument("dst")
    to_orbax.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the source's")
    to_orbax.add_argument("--force", action="store_true", help="replace an existing DST")
    to_hf = commands.add_parser("orbax-to-hf", help="Orbax checkpoint -> HF checkpoint directory")
    to_hf.add_argument("src")
    to_hf.add_argument("dst")
    to_hf.add_argument("--max-shard-size", default="5GB", type=parse_size,
                       help="e.g. 5GB, 5G, 500MB, 2GiB (default 5GB)")
    to_hf.add_argument("--force", action="store_true", help="replace an existing DST")
    to_hf.add_argument("--quantize", choices=("fp8", "nvfp4"),
                       help="write ModelOpt's quantized layout (vLLM / TensorRT-LLM), with the selective recipe: "
                            "attention, the Mamba layers next to it, MTP, embeddings and head stay unquantized")
    to_hf.add_argument("--calibration-data", default="synthetic",
                       help="--quantize's calibration text: synthetic, or comma-separated txt / jsonl globs")
    to_hf.add_argument("--calibration-tokenizer", default="",
                       help="tokenizer.json for --calibration-data files (default: the checkpoint's)")
    to_hf.add_argument("--calibration-batches", type=int, default=8,
                       help="batches of 4 windows measured for the static input scales (0: write none)")
    to_hf.add_argument("--calibration-seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # orbax notes each metadata file it does not need at WARNING
    try:
        if args.command == "hf-to-orbax":
            hf_to_orbax(args.src, args.dst, args.dtype, args.force)
        else:
            quantize = Quantize(args.quantize, args.calibration_data, args.calibration_tokenizer,
                                args.calibration_batches, args.calibration_seq_len) if args.quantize else None
            orbax_to_hf(args.src, args.dst, args.max_shard_size, args.force, quantize)
    except (CheckpointError, ConfigError, DataError, FileExistsError) as e:
        print(f"nemojax-convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
