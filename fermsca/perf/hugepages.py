"""Back large allocations with transparent huge pages on CPU hosts (a train-step speed lever).

XLA's CPU runtime allocates its large activation buffers afresh every step, and glibc serves each
with a new memory mapping, so every step pays one page fault per 4 KiB touched (about 18,000 for the
stem's 75 MB output at batch 128). glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes
malloc ask for transparent huge pages on those mappings: 512 times fewer faults. Measured on the
train step: `python -m experiments.perf.perf_levers` (experiments/results/bench/perf_levers.json).

glibc reads tunables once, at process start, so `ensure()` restarts the running
command once with the tunable added. It is called by the command-line entry points (`fermsca.main`,
`fermsca.bench`, the benchmark experiments), never on import. `FERMSCA_HUGEPAGES=0` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> tuple[bool, str]:
    """(supported, why not): Linux with glibc >= 2.35 and transparent huge pages not disabled."""
    if sys.platform != "linux":
        return False, f"not Linux ({sys.platform})"
    libc, version = platform.libc_ver()
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    if libc != "glibc" or major_minor < (2, 35):
        return False, f"needs glibc >= 2.35 (found {libc or 'unknown'} {version})"
    try:
        with open(_THP_SETTING) as f:
            if "[never]" in f.read():
                return False, f"transparent huge pages are disabled ({_THP_SETTING})"
    except OSError:
        return False, f"no {_THP_SETTING}"
    return True, ""


def active() -> bool:
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def ensure() -> None:
    """Re-executes the current command with `GLIBC_TUNABLES` += glibc.malloc.hugetlb=1, once.

    Does nothing when already set, when `FERMSCA_HUGEPAGES=0`, or where unsupported. Call it first
    thing under `if __name__ == "__main__":`, before threads or files are opened.
    """
    if os.environ.get("FERMSCA_HUGEPAGES", "1") == "0" or active():
        return
    if os.environ.get("_FERMSCA_HUGEPAGES_RESTARTED"):  # the tunable did not survive: give up
        return
    if not supported()[0]:
        return
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    env = dict(os.environ, GLIBC_TUNABLES=":".join(tunables + [TUNABLE]),
               _FERMSCA_HUGEPAGES_RESTARTED="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
