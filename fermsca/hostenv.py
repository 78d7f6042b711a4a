"""Process set-up on CPU hosts: back large allocations with transparent huge pages.

XLA's CPU runtime allocates its large activation buffers afresh every step, and glibc serves each
with a new memory mapping, so every step pays one page fault per 4 KiB touched (about 18,000 for the
stem's 75 MB output at batch 128). glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) makes
malloc ask for transparent huge pages on those mappings: 512 times fewer faults. Measured on the
train step: `python -m experiments.perf_levers` (experiments/results/bench/perf_levers.json).

glibc reads tunables once, at process start, so `ensure_hugepage_malloc()` restarts the running
command once with the tunable added. It is called by the command-line entry points (`fermsca.main`,
`fermsca.bench`, the benchmark experiments), never on import. `FERMSCA_HUGEPAGES=0` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def hugepage_malloc_supported() -> tuple[bool, str]:
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


def hugepage_malloc_active() -> bool:
    return TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def ensure_hugepage_malloc() -> None:
    """Re-executes the current command with `GLIBC_TUNABLES` += glibc.malloc.hugetlb=1, once.

    Does nothing when already set, when `FERMSCA_HUGEPAGES=0`, or where unsupported. Call it first
    thing under `if __name__ == "__main__":`, before threads or files are opened.
    """
    if os.environ.get("FERMSCA_HUGEPAGES", "1") == "0" or hugepage_malloc_active():
        return
    if os.environ.get("_FERMSCA_HUGEPAGES_RESTARTED"):  # the tunable did not survive: give up
        return
    if not hugepage_malloc_supported()[0]:
        return
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    env = dict(os.environ, GLIBC_TUNABLES=":".join(tunables + [TUNABLE]),
               _FERMSCA_HUGEPAGES_RESTARTED="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


CACHE_ENV = "FERMSCA_COMPILATION_CACHE"
_OFF = ("", "0", "off", "none", "false")


def default_compilation_cache() -> str | None:
    """Where compiled steps are kept between runs: `$FERMSCA_COMPILATION_CACHE` ('off' disables
    it), else `$XDG_CACHE_HOME/fermsca/jax` (`~/.cache/fermsca/jax`)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fermsca", "jax")


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (None or 'off': leaves it off), so
    a second run, a resume or an evaluation of the same model loads its compiled steps instead of
    compiling them again. Returns the directory used."""
    if directory is None or directory.strip().lower() in _OFF:
        return None
    import jax

    directory = os.path.abspath(os.path.expanduser(directory))
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every step worth a file: the small ones add up over a run's train, eval and init steps.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
