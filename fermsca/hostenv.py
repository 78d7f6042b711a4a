"""The host: JAX's persistent compilation cache (on by default for every command) and the CPU's name.

A second run, a resume or an evaluation of the same model loads its compiled steps from disk
instead of compiling them again. Every record of a run or a benchmark names the CPU it ran on
(`cpu`): machines sold under one model name ("AMD EPYC") differ by generation and vector ISA, and
so by a factor of 2-4 in speed. The huge-page malloc set-up lives in `fermsca.perf.hugepages`.
"""

from __future__ import annotations

import os

CACHE_ENV = "FERMSCA_COMPILATION_CACHE"
# The vector extensions that decide which kernels XLA and oneDNN run, as /proc/cpuinfo spells them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
             "amx_tile")
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


def cpu(cpuinfo: str | None = None) -> dict:
    """The CPU as /proc/cpuinfo's first processor describes it: `name` (model name, then family,
    model and the vector ISA, e.g. "AMD EPYC (family 26, model 2; avx2 fma avx512f avx512_bf16)"),
    `model_name`, `family`, `model` and `isa`. `cpuinfo` is the file's text (read when None);
    where there is no such file, `name` is what `platform` knows."""
    import platform

    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    model_name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ISA_FLAGS if f in flags]
    family = int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None
    model = int(fields["model"]) if fields.get("model", "").isdigit() else None
    details = []
    if family is not None:
        details.append(f"family {family}" + (f", model {model}" if model is not None else ""))
    if isa:
        details.append(" ".join(isa))
    name = model_name + (f" ({'; '.join(details)})" if details else "")
    return {"name": name, "model_name": model_name, "family": family, "model": model, "isa": isa}
