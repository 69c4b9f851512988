"""One Mamba-2 layer's SSD scan at Nemotron-H-8B shapes (128 heads x 64, state 128, 8 groups, chunk
128): the XLA chunked scan (`nemojax/ops/ssd.py`) against the Pallas kernel (`pallas/ssd.py`), forward
and forward + backward, in one process.

Prints, per implementation and length, the median time, tokens/s and the achieved bandwidth: the
bytes the scan must move at least (x, dt, B, C in, y out; for the backward also dy in, and dx, ddt,
dB, dC out) over the time. Compare against a streaming copy measured in the same process.

    python -m benchmarks.ssd [--lengths 2048,8192,32768] [--impls xla,pallas] [--dtype bfloat16]

On the CPU the Pallas kernel runs interpreted (correct, not fast): the default there is 2048 tokens
and a reduced head count (--heads); pass --lengths to go further.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import median_seconds
from nemojax.hostmem import reexec_with_huge_pages
from nemojax.ops.ssd import ssd_chunked
from pallas.ssd import ssd as ssd_pallas

HEAD_DIM, STATE, GROUPS, CHUNK = 64, 128, 8, 128
IMPLS = {"xla": ssd_chunked, "pallas": ssd_pallas}


def inputs(length: int, heads: int, dtype):
    k = jax.random.split(jax.random.key(0), 5)
    return dict(
        x=jax.random.normal(k[0], (1, length, heads, HEAD_DIM), dtype),
        dt=jax.nn.softplus(jax.random.normal(k[1], (1, length, heads)) - 2.0),
        A=-jnp.exp(jax.random.normal(k[2], (heads,))),
        B=jax.random.normal(k[3], (1, length, GROUPS, STATE), dtype),
        C=jax.random.normal(k[4], (1, length, GROUPS, STATE), dtype),
    )


def minimum_bytes(args, backward: bool) -> int:
    """Inputs read and outputs (fp32 y) written once; the backward also reads dy and writes a gradient
    of each input."""
    size = lambda t: t.size * t.dtype.itemsize  # noqa: E731
    read = sum(size(args[k]) for k in ("x", "dt", "B", "C"))
    y = args["x"].size * 4
    return read + y + (y + read if backward else 0)


def copy_bytes_per_second(nbytes: int = 1 << 28) -> float:
    """Read + write rate of a jitted elementwise op over a 256 MB array: the streaming ceiling."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 2.0)
    return 2 * nbytes / median_seconds(lambda: f(a).block_until_ready())


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2048" if on_cpu else "2048,4096,8192,16384,32768")
    parser.add_argument("--heads", type=int, default=16 if on_cpu else 128)
    parser.add_argument("--impls", default="xla,pallas")
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)

    copy = copy_bytes_per_second()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); heads {args.heads} x {HEAD_DIM}, "
          f"state {STATE}, groups {GROUPS}, chunk {CHUNK}, inputs {dtype.name}; streaming copy {copy / 1e9:.1f} GB/s")
    print(f"{'impl':8}{'pass':10}{'tokens':>8}{'ms':>10}{'tokens/s':>12}{'GB/s':>8}{'of copy':>9}")
    for length in map(int, args.lengths.split(",")):
        data = inputs(length, args.heads, dtype)
        for name in args.impls.split(","):
            impl = IMPLS[name]
            forward = jax.jit(lambda d: impl(chunk_size=CHUNK, **d))
            dy = jnp.ones((1, length, args.heads, HEAD_DIM), jnp.float32)
            both = jax.jit(lambda d: jax.vjp(lambda d: impl(chunk_size=CHUNK, **d)[0], d)[1](dy))
            for pass_name, fn, backward in (("forward", forward, False), ("fwd+bwd", both, True)):
                seconds = median_seconds(lambda: jax.block_until_ready(fn(data)), repeats=args.repeats)
                rate = minimum_bytes(data, backward) / seconds
                print(f"{name:8}{pass_name:10}{length:>8}{seconds * 1e3:>10.2f}{length / seconds:>12.3g}"
                      f"{rate / 1e9:>8.1f}{rate / copy:>9.0%}")


if __name__ == "__main__":
    reexec_with_huge_pages()  # as train.py does (nemojax/hostmem.py)
    main()
