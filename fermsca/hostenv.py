"""JAX's persistent compilation cache, on by default for every command.

A second run, a resume or an evaluation of the same model loads its compiled steps from disk
instead of compiling them again. The huge-page malloc set-up lives in `fermsca.perf.hugepages`.
"""

from __future__ import annotations

import os

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
