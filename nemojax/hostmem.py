"""Host memory set-up for the command lines: huge pages for XLA:CPU's per-call scratch.

XLA:CPU maps each execution's scratch afresh (2.7 GB for a forward+backward of the 110M `small`
model on 2048 tokens) and unmaps it afterwards. Where the kernel's transparent huge pages are in
"madvise" mode, the usual default, every 4 KB page of it then costs a fault on first touch: ~800k
faults and ~3 s of kernel time per step on a 2-core CPU, 15% of the step. glibc advises huge pages
for its large mappings when `GLIBC_TUNABLES` asks for it (glibc >= 2.35), which cuts the faults
~200-fold. The tunable is read when a process starts, so the command lines re-execute themselves
once with it set. A `glibc.malloc.hugetlb` already in `GLIBC_TUNABLES` (e.g. `=0`) is left as is.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_need_advice() -> bool:
    """True where glibc can advise huge pages and the kernel grants them only when advised."""
    libc, version = platform.libc_ver()
    if not sys.platform.startswith("linux") or libc != "glibc":
        return False
    if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
        return False
    try:
        with open(THP_MODE) as f:
            return "[madvise]" in f.read()
    except OSError:
        return False


def with_huge_pages(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with glibc asked to advise huge pages, or None where that would change nothing (already
    set either way, or no need). Launchers of many processes can set it up front and skip each re-exec."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables or not huge_pages_need_advice():
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def reexec_with_huge_pages() -> None:
    """Restart this interpreter, with the same command line, with glibc advising huge pages.

    Call it first thing in a command line's `__main__` (before JAX starts): it returns at once when
    the tunable is already set, or where it would change nothing.
    """
    environ = with_huge_pages(dict(os.environ))
    if environ is None:
        return
    os.environ["GLIBC_TUNABLES"] = environ["GLIBC_TUNABLES"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
