"""The command lines' host-memory set-up (nemojax/hostmem.py): one re-execution with glibc advising
huge pages, and the page faults of XLA:CPU's scratch that it saves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nemojax.hostmem import TUNABLE, huge_pages_need_advice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The module alone, by path: the package would import JAX on each of the two starts.
REEXEC = f"""
import importlib.util, os
print("run", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
spec = importlib.util.spec_from_file_location("hostmem", {os.path.join(REPO, "nemojax", "hostmem.py")!r})
hostmem = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hostmem)
hostmem.reexec_with_huge_pages()
print("main", os.environ.get("GLIBC_TUNABLES", ""))
"""

# The scratch of one call: sin(x) (64 MB) cannot fuse into the dot that reads it.
FAULTS = """
import resource
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sin(x) @ w)
x, w = jnp.ones((8192, 2048)), jnp.ones((2048, 8))
for _ in range(2):
    f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x, w).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(code: str, tunables: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("\n")[:-1]


def test_reexecutes_once_with_the_tunable_where_it_helps():
    if huge_pages_need_advice():
        assert run(REEXEC, None) == ["run ", f"run {TUNABLE}=1", f"main {TUNABLE}=1"]
        other = "glibc.malloc.arena_max=4"  # other tunables are kept
        assert run(REEXEC, other)[-1] == f"main {other}:{TUNABLE}=1"
    else:  # nothing to gain: no second start
        assert run(REEXEC, None) == ["run ", "main "]


def test_an_explicit_setting_is_respected():
    assert run(REEXEC, f"{TUNABLE}=0") == [f"run {TUNABLE}=0", f"main {TUNABLE}=0"]


@pytest.mark.skipif(not huge_pages_need_advice(), reason="transparent huge pages are not in madvise mode here")
def test_huge_pages_cut_the_page_faults_of_xla_scratch():
    plain = int(run(FAULTS, f"{TUNABLE}=0")[-1])
    advised = int(run(FAULTS, f"{TUNABLE}=1")[-1])
    assert plain > 64 * 2**20 // 4096 // 2, plain  # most of the 64 MB scratch is touched afresh, 4 KB at a time
    assert advised < plain / 8, (advised, plain)
