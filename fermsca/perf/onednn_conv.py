"""CPU fast path for 2-D convolutions: oneDNN primitives called from XLA through `jax.ffi`.

The default on x86-64 Linux CPUs (`config.model.conv_impl = "auto"`, resolved by
`perf.resolve_conv_impl`); "onednn" requires it, "xla" never uses it.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (as `flax.linen.Conv` calls it,
`nn.Conv(..., conv_general_dilated=onednn_conv.conv_general_dilated)`). NHWC / HWIO convolutions
with any strides, kernel dilation and non-negative padding run through oneDNN's forward,
backward-data and backward-weights primitives (gradients via `jax.custom_vjp`), in float32, or in
bfloat16 where oneDNN has a JIT bfloat16 convolution for this CPU (`bfloat16_reason()`: AVX-512 and
up, native with AVX512_BF16 or AMX; accumulated in float32, the output in bfloat16 or, with
`preferred_element_type=float32`, in float32; gradients in the operands' dtype); everything else
(other dtypes or layouts, input dilation, grouped convolutions, a non-CPU backend, or oneDNN missing)
goes to `jax.lax.conv_general_dilated` unchanged.

The C++ source (`csrc/onednn_conv.cc`) is compiled with g++ on first use into a cache directory
(`$FERMSCA_CACHE_DIR`, default `~/.cache/fermsca`), keyed by the source, jaxlib and oneDNN versions.
It needs g++ and oneDNN's TBB build from PyPI (`onednn-cpu-tbb onednn-devel-cpu-tbb
intel-cmplr-lib-rt`: the runtime library, the headers, and the compiler runtime that library links
against; `pip install -e .` installs them on x86-64 Linux), or a CPU build of oneDNN under
`$DNNLROOT`. The extension is linked with an rpath to oneDNN's lib directory, so no LD_LIBRARY_PATH
is needed. `available()` / `unavailable_reason()` say whether the path can be used.

Threads: oneDNN runs each primitive on all cores of the process's affinity mask (TBB;
`OMP_NUM_THREADS` does not apply). Concurrent custom calls (the two backward convolutions, one per
simulated device) share TBB's workers; with an OpenMP build of oneDNN they are serialised instead
(`FERMSCA_ONEDNN_SERIALIZE=1` / `0` forces either).

Sharding: the custom calls are wrapped in `custom_partitioning`, so a batch-sharded input stays
sharded (each device convolves its own slice; the kernel gradient is summed over the batch axes)
instead of being gathered onto every device.

`FERMSCA_ONEDNN=0` in the environment disables the fast path (everything goes to XLA).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "onednn_conv.cc"
LIB_NAME = "libfermsca_onednn_conv"
TARGETS = {
    "fwd": "fermsca_onednn_conv_fwd",
    "bwd_data": "fermsca_onednn_conv_bwd_data",
    "bwd_weights": "fermsca_onednn_conv_bwd_weights",
}
# Element-type codes of the custom calls (csrc/onednn_conv.cc's ElementType).
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(jnp.bfloat16): 1}
INSTALL_HINT = ("pip install -e . (on x86-64 Linux it installs onednn-cpu-tbb onednn-devel-cpu-tbb "
                "intel-cmplr-lib-rt)")

_NHWC_DN = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


class OneDNNUnavailable(RuntimeError):
    """The oneDNN fast path cannot be built or loaded (the message says what is missing)."""


# ----------------------------------------------------------------------------------------------
# Locating oneDNN, building and loading the extension


class _OneDNN(NamedTuple):
    include_dir: Path
    lib_file: Path  # the runtime library (libdnnl.so.3 ...)
    version: str
    cpu_runtime: str  # threading runtime of the build: OMP, TBB, ...


# PyPI distributions that ship oneDNN: runtime and headers, one pair per CPU threading runtime; all of
# them install into <prefix>/lib and <prefix>/include. The TBB build is the one to use: its
# work-stealing threads share the two cores with XLA's thread pool gracefully, where the OpenMP builds'
# spinning barriers slow down badly whenever another thread or process wants a core. Its libdnnl
# also needs libimf / libintlc from `intel-cmplr-lib-rt`, which the wheel does not declare.
# `onednn` / `onednn-devel` (2024 and later) are built with the SYCL CPU runtime, which needs a SYCL
# CPU device (Intel's OpenCL CPU runtime, 2 GB with its dependencies, for about 3% on this network's
# convolutions: experiments/perf/README.md), and are not used.
RUNTIME_DISTS = ("onednn-cpu-tbb", "onednn-cpu-gomp", "onednn-cpu-iomp", "onednn")
HEADER_DISTS = ("onednn-devel-cpu-tbb", "onednn-devel-cpu-gomp", "onednn-devel-cpu-iomp", "onednn-devel")
_USABLE_CPU_RUNTIMES = ("OMP", "TBB", "SEQ", "THREADPOOL")


def _dist_prefixes(name: str) -> list[Path]:
    """Installation prefixes of a distribution's oneDNN files (parents of its lib/ or include/)."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return []
    out = []
    for f in dist.files or ():
        parts = Path(f).parts
        if Path(f).name.startswith("libdnnl.so") or Path(f).name == "dnnl.hpp":
            path = Path(dist.locate_file(f)).resolve()
            # .../<prefix>/lib/libdnnl.so.3 or .../<prefix>/include/oneapi/dnnl/dnnl.hpp
            depth = 2 if parts[-2:-1] != ("dnnl",) else 4
            out.append(path.parents[depth - 1])
    return out


def _candidate_prefixes() -> list[Path]:
    out: list[Path] = []
    for env in ("DNNLROOT", "ONEDNN_ROOT"):
        if os.environ.get(env):
            out.append(Path(os.environ[env]).expanduser().resolve())
    if not out:  # an explicit root is the only one looked at
        for name in HEADER_DISTS + RUNTIME_DISTS:
            out += _dist_prefixes(name)
        out += [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)]
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _lib_file(prefix: Path) -> Path | None:
    for sub in ("lib", "lib64"):
        d = prefix / sub
        if d.is_dir():
            # The soname (libdnnl.so.3) first, then any other versioned or unversioned file.
            files = sorted(d.glob("libdnnl.so*"), key=lambda p: (p.name.count(".") != 2, p.name))
            files = [f for f in files if f.is_file()]
            if files:
                return files[0]
    return None


def _header_defines(include_dir: Path, header: str, prefix: str) -> dict[str, str]:
    fields = {}
    for line in (include_dir / "oneapi" / "dnnl" / header).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "#define" and parts[1].startswith(prefix):
            fields[parts[1][len(prefix):]] = parts[2].strip('"')
    return fields


def _find_onednn() -> _OneDNN:
    prefixes = _candidate_prefixes()
    problems = []
    for prefix in prefixes:
        include_dir, lib_file = prefix / "include", _lib_file(prefix)
        has_headers = (include_dir / "oneapi" / "dnnl" / "dnnl.hpp").is_file()
        if not has_headers and lib_file is None:
            continue
        if not has_headers:
            problems.append(f"{prefix}: libdnnl but no headers (install the matching onednn-devel-* package)")
            continue
        if lib_file is None:
            problems.append(f"{prefix}: headers but no libdnnl.so (install the matching onednn-cpu-* "
                            "package)")
            continue
        version = _header_defines(include_dir, "dnnl_version.h", "DNNL_VERSION_")
        version_str = ".".join(version.get(k, "?") for k in ("MAJOR", "MINOR", "PATCH"))
        runtime = _header_defines(include_dir, "dnnl_config.h", "DNNL_").get("CPU_RUNTIME", "?")
        runtime = runtime.removeprefix("DNNL_RUNTIME_")
        if runtime not in _USABLE_CPU_RUNTIMES:
            problems.append(f"{prefix}: oneDNN {version_str} is built with the {runtime} CPU runtime "
                            "(the `onednn` PyPI package needs a SYCL CPU device)")
            continue
        return _OneDNN(include_dir, lib_file, version_str, runtime)
    detail = "; ".join(problems) if problems else "no oneDNN headers or library found"
    raise OneDNNUnavailable(
        f"oneDNN not usable: {detail}. Install a CPU build from PyPI with `{INSTALL_HINT}` (or set "
        f"DNNLROOT to a oneDNN install); searched {[str(p) for p in prefixes]}."
    )


def cache_dir() -> Path:
    root = os.environ.get("FERMSCA_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fermsca"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise OneDNNUnavailable(
            f"C++ compiler {cxx!r} not found on PATH; the oneDNN convolution extension is compiled on "
            "first use (install g++, e.g. `apt-get install g++`, or set CXX)."
        )
    return path


def _build_key(onednn: _OneDNN, cxx: str) -> str:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(importlib.metadata.version("jaxlib").encode())
    h.update(onednn.version.encode())
    h.update(onednn.cpu_runtime.encode())
    h.update(str(onednn.lib_file).encode())
    h.update(str(onednn.include_dir).encode())
    h.update(cxx.encode())
    return h.hexdigest()[:20]


def _compile_command(cxx: str, onednn: _OneDNN, out: Path) -> list[str]:
    lib_dir = onednn.lib_file.parent
    return [
        cxx, "-O2", "-fPIC", "-shared", "-std=c++17", "-DNDEBUG", "-w",
        f"-I{jax.ffi.include_dir()}", f"-I{onednn.include_dir}",
        str(SOURCE), "-o", str(out),
        str(onednn.lib_file),
        # DT_RPATH (not RUNPATH) so that libdnnl's own dependencies (TBB, SYCL, ...) that sit next
        # to it are found too, without LD_LIBRARY_PATH.
        f"-Wl,--disable-new-dtags,-rpath,{lib_dir}",
    ]


def build(force: bool = False) -> Path:
    """Compiles the extension if it is not in the cache yet; returns the shared library's path."""
    onednn = _find_onednn()
    cxx = _compiler()
    if not SOURCE.is_file():
        raise OneDNNUnavailable(f"source {SOURCE} is missing")
    directory = cache_dir()
    target = directory / f"{LIB_NAME}-{_build_key(onednn, cxx)}.so"
    if target.is_file() and not force:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = _compile_command(cxx, onednn, tmp)
        log.info("building the oneDNN convolution extension: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise OneDNNUnavailable(
                f"compiling {SOURCE.name} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n"
                f"{proc.stderr[-4000:]}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: concurrent builders each rename a complete file
    finally:
        tmp.unlink(missing_ok=True)
    return target


def supported_platform() -> bool:
    """True on x86-64 Linux, the only platform the PyPI oneDNN builds (and so this path) install on."""
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def disabled() -> bool:
    """True when `FERMSCA_ONEDNN=0` turns the fast path off (a choice, not a failure)."""
    return os.environ.get("FERMSCA_ONEDNN", "1") == "0"


_lock = threading.Lock()
_state: dict = {}


def _load() -> ctypes.CDLL:
    """Builds (if needed), loads and registers the extension once per process."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        if "error" in _state:
            raise OneDNNUnavailable(_state["error"])
        try:
            if disabled():
                raise OneDNNUnavailable("disabled by FERMSCA_ONEDNN=0")
            path = build()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                hint = ""
                if "libimf" in str(e) or "libintlc" in str(e) or "libsvml" in str(e):
                    hint = " (the oneDNN TBB build needs `pip install intel-cmplr-lib-rt`)"
                elif "libtbb" in str(e):
                    hint = " (install `tbb` from PyPI)"
                raise OneDNNUnavailable(f"loading {path} failed: {e}{hint}") from e
            lib.fermsca_onednn_version.restype = ctypes.c_char_p
            lib.fermsca_onednn_impl_info.restype = ctypes.c_int
            lib.fermsca_onednn_impl_info.argtypes = [
                ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int64]
            lib.fermsca_onednn_cache_size.restype = ctypes.c_int64
            for symbol in TARGETS.values():
                jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        except OneDNNUnavailable as e:
            _state["error"] = str(e)
            raise
        _state["lib"] = lib
        _state["path"] = path
        return lib


def available() -> bool:
    """True when the oneDNN extension is built (or buildable) and loaded."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """None when the fast path works; otherwise why not (what is missing)."""
    try:
        _load()
    except OneDNNUnavailable as e:
        return str(e)
    return None


def onednn_version() -> str:
    """Version of the oneDNN library actually loaded (e.g. '3.13.2 (<git hash>)')."""
    return _load().fermsca_onednn_version().decode()


def build_info() -> dict:
    """Where the extension and oneDNN came from: library paths, oneDNN version and CPU runtime."""
    _load()
    found = _find_onednn()
    return {
        "extension": str(_state["path"]),
        "onednn_version": onednn_version(),
        "onednn_cpu_runtime": found.cpu_runtime,
        "onednn_library": str(found.lib_file),
        "onednn_include": str(found.include_dir),
    }


def plan_cache_size() -> int:
    """Number of oneDNN primitives built so far in this process."""
    return int(_load().fermsca_onednn_cache_size())


# ----------------------------------------------------------------------------------------------
# The convolution


class ConvConfig(NamedTuple):
    """Static attributes of one convolution (hashable; passed to the custom calls)."""

    strides: tuple[int, int]
    dilation: tuple[int, int]
    pad_lo: tuple[int, int]
    pad_hi: tuple[int, int]
    out_dtype: str = "float32"  # the forward's output (its operands' dtype, or float32)


def _attrs(cfg: ConvConfig) -> dict:
    return dict(
        strides=np.asarray(cfg.strides, np.int64),
        dilation=np.asarray(cfg.dilation, np.int64),
        pad_lo=np.asarray(cfg.pad_lo, np.int64),
        pad_hi=np.asarray(cfg.pad_hi, np.int64),
    )


def _out_spatial(cfg: ConvConfig, hw: tuple[int, int], khw: tuple[int, int]) -> tuple[int, int]:
    return tuple(
        (n + lo + hi - ((k - 1) * d + 1)) // s + 1
        for n, k, s, d, lo, hi in zip(hw, khw, cfg.strides, cfg.dilation, cfg.pad_lo, cfg.pad_hi, strict=True)
    )


def _call(kind: str, a, b, out_shape, out_dtype, cfg: ConvConfig):
    _load()  # registers the targets (once per process)
    return jax.ffi.ffi_call(
        TARGETS[kind], jax.ShapeDtypeStruct(out_shape, out_dtype), vmap_method="sequential"
    )(a, b, **_attrs(cfg))


# Per-device (or unsharded) custom calls. They are wrapped in `custom_partitioning` below; these are
# what each device runs on its own slice.
def _fwd_local(x, w, cfg: ConvConfig):
    oh, ow = _out_spatial(cfg, x.shape[1:3], w.shape[0:2])
    return _call("fwd", x, w, (x.shape[0], oh, ow, w.shape[3]), np.dtype(cfg.out_dtype), cfg)


def _bwd_data_local(dy, w, x_hw: tuple[int, int], cfg: ConvConfig):
    return _call("bwd_data", dy, w, (dy.shape[0], *x_hw, w.shape[2]), dy.dtype, cfg)


def _bwd_weights_local(x, dy, w_shape: tuple[int, ...], cfg: ConvConfig):
    return _call("bwd_weights", x, dy, tuple(w_shape), x.dtype, cfg)


# ---- sharding rules: batch (dim 0 of activations) may be sharded, everything else is replicated.


def _batch_axes(sharding) -> tuple | None:
    """Mesh axes that shard dim 0 of an activation (None when unsharded or not a NamedSharding)."""
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) == 0:
        return None
    return sharding.spec[0]


def _axes_tuple(axes) -> tuple:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, tuple | list) else (axes,)


def _act_sharding(mesh, axes):
    return NamedSharding(mesh, P(axes, None, None, None))


def _replicated(mesh):
    return NamedSharding(mesh, P())


@functools.partial(custom_partitioning, static_argnums=(2,))
def _fwd_part(x, w, cfg):
    return _fwd_local(x, w, cfg)


def _fwd_infer(cfg, mesh, arg_shapes, result_shape):
    return _act_sharding(mesh, _batch_axes(arg_shapes[0].sharding))


def _fwd_partition(cfg, mesh, arg_shapes, result_shape):
    axes = _batch_axes(arg_shapes[0].sharding)
    arg_shardings = (_act_sharding(mesh, axes), _replicated(mesh))
    return mesh, functools.partial(_fwd_local, cfg=cfg), _act_sharding(mesh, axes), arg_shardings


_fwd_part.def_partition(
    infer_sharding_from_operands=_fwd_infer,
    partition=_fwd_partition,
    sharding_rule="b h w c, k l c o -> b p q o",
    need_replication_factors=("h", "w", "c", "k", "l", "o", "p", "q"),
)


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _bwd_data_part(dy, w, x_hw, cfg):
    return _bwd_data_local(dy, w, x_hw, cfg)


def _bwd_data_infer(x_hw, cfg, mesh, arg_shapes, result_shape):
    return _act_sharding(mesh, _batch_axes(arg_shapes[0].sharding))


def _bwd_data_partition(x_hw, cfg, mesh, arg_shapes, result_shape):
    axes = _batch_axes(arg_shapes[0].sharding)
    arg_shardings = (_act_sharding(mesh, axes), _replicated(mesh))
    lower = functools.partial(_bwd_data_local, x_hw=x_hw, cfg=cfg)
    return mesh, lower, _act_sharding(mesh, axes), arg_shardings


_bwd_data_part.def_partition(
    infer_sharding_from_operands=_bwd_data_infer,
    partition=_bwd_data_partition,
    sharding_rule="b p q o, k l c o -> b h w c",
    need_replication_factors=("p", "q", "o", "k", "l", "c", "h", "w"),
)


@functools.partial(custom_partitioning, static_argnums=(2, 3))
def _bwd_weights_part(x, dy, w_shape, cfg):
    return _bwd_weights_local(x, dy, w_shape, cfg)


def _bwd_weights_infer(w_shape, cfg, mesh, arg_shapes, result_shape):
    return _replicated(mesh)


def _bwd_weights_partition(w_shape, cfg, mesh, arg_shapes, result_shape):
    axes = _batch_axes(arg_shapes[0].sharding)
    arg_shardings = (_act_sharding(mesh, axes), _act_sharding(mesh, axes))
    reduce_axes = _axes_tuple(axes)

    def lower(x, dy):
        dw = _bwd_weights_local(x, dy, w_shape, cfg)
        return lax.psum(dw, reduce_axes) if reduce_axes else dw

    return mesh, lower, _replicated(mesh), arg_shardings


_bwd_weights_part.def_partition(
    infer_sharding_from_operands=_bwd_weights_infer,
    partition=_bwd_weights_partition,
    sharding_rule="b h w c, b p q o -> k l c o",
    reduction_factors=("b",),
    need_replication_factors=("h", "w", "c", "p", "q", "o", "k", "l"),
)


# ---- differentiation


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, cfg: ConvConfig):
    return _fwd_part(x, w, cfg)


def _conv_fwd(x, w, cfg: ConvConfig):
    return _fwd_part(x, w, cfg), (x, w)


def _conv_bwd(cfg: ConvConfig, res, dy):
    x, w = res
    dy = dy.astype(x.dtype)  # a float32 output of bfloat16 operands: its gradient enters as bfloat16
    dx = _bwd_data_part(dy, w, tuple(x.shape[1:3]), cfg)
    dw = _bwd_weights_part(x, dy, tuple(w.shape), cfg)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _as_pairs(v, n: int = 2) -> tuple[int, ...] | None:
    if v is None:
        return (1,) * n
    t = tuple(int(i) for i in v)
    return t if len(t) == n else None


def plan(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
         feature_group_count=1, batch_group_count=1, preferred_element_type=None) -> ConvConfig | str:
    """The oneDNN configuration for a convolution, or a string saying why it goes to XLA instead."""
    if disabled():
        return "disabled by FERMSCA_ONEDNN=0"
    if np.ndim(lhs) != 4 or np.ndim(rhs) != 4:
        return "not a 2-D convolution"
    if lhs.dtype != rhs.dtype or lhs.dtype not in DTYPE_CODES:
        return f"dtypes {lhs.dtype}/{rhs.dtype} (only float32 or bfloat16, both alike)"
    out_dtype = lhs.dtype if preferred_element_type is None else np.dtype(preferred_element_type)
    if out_dtype not in (lhs.dtype, np.dtype(np.float32)):
        return f"preferred_element_type {preferred_element_type}"
    if feature_group_count != 1 or batch_group_count != 1:
        return "grouped convolution"
    if _as_pairs(lhs_dilation) != (1, 1):
        return "input (lhs) dilation"
    strides, dilation = _as_pairs(window_strides), _as_pairs(rhs_dilation)
    if strides is None or dilation is None or min(strides + dilation) < 1:
        return "unsupported strides / dilation"
    try:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError) as e:
        return f"dimension numbers: {e}"
    if dn != _NHWC_DN:
        return "layout other than NHWC / HWIO"
    if rhs.shape[2] != lhs.shape[3]:
        return "channel mismatch"
    if 0 in lhs.shape or 0 in rhs.shape:
        return "empty operand"
    khw = tuple(rhs.shape[:2])
    if isinstance(padding, str):
        dilated = tuple((k - 1) * d + 1 for k, d in zip(khw, dilation, strict=True))
        pads = lax.padtype_to_pads(lhs.shape[1:3], dilated, strides, padding)
    else:
        pads = [tuple(int(i) for i in p) for p in padding]
    if len(pads) != 2 or any(len(p) != 2 for p in pads) or min(min(p) for p in pads) < 0:
        return "negative or malformed padding"
    cfg = ConvConfig(strides, dilation, (pads[0][0], pads[1][0]), (pads[0][1], pads[1][1]), out_dtype.name)
    if min(_out_spatial(cfg, tuple(lhs.shape[1:3]), khw)) < 1:
        return "empty output"
    if jax.default_backend() != "cpu":
        return f"backend {jax.default_backend()} (oneDNN path is CPU only)"
    reason = unavailable_reason()
    if reason is None and lhs.dtype == jnp.bfloat16:
        reason = bfloat16_reason()
    if reason is not None:
        return reason
    return cfg


_warned: set = set()


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """Drop-in for `jax.lax.conv_general_dilated`: oneDNN where supported, XLA otherwise.

    `precision` is ignored on the oneDNN path (it accumulates in float32).
    """
    cfg = plan(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
               feature_group_count, batch_group_count, preferred_element_type)
    if isinstance(cfg, ConvConfig):
        return _conv(lhs, rhs, cfg)
    if cfg not in _warned and ("oneDNN" in cfg or "compil" in cfg):
        _warned.add(cfg)
        log.warning("oneDNN convolution unavailable, using XLA: %s", cfg)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type,
    )


def conv(x, w, strides=(1, 1), padding="SAME"):
    """oneDNN convolution of NHWC `x` with HWIO `w` (float32 or bfloat16, both alike); raises when it
    cannot run on oneDNN."""
    cfg = plan(x, w, strides, padding, dimension_numbers=_NHWC_DN)
    if not isinstance(cfg, ConvConfig):
        raise OneDNNUnavailable(cfg)
    return _conv(x, w, cfg)


def impl_info(kind: str, x_shape, w_shape, strides=(1, 1), padding="SAME", dtype=np.float32,
              out_dtype=None) -> str:
    """The oneDNN implementation chosen for a convolution ('fwd', 'bwd_data' or 'bwd_weights') whose
    inputs are `dtype` and whose output is `out_dtype` (default: `dtype`)."""
    dtype = np.dtype(dtype)
    out_dtype = dtype if out_dtype is None else np.dtype(out_dtype)
    if dtype not in DTYPE_CODES or out_dtype not in (dtype, np.dtype(np.float32)):
        raise ValueError(f"dtypes {dtype} -> {out_dtype}: only float32 or bfloat16 inputs, with a float32 "
                         "output or one of theirs")
    x = jax.ShapeDtypeStruct(tuple(x_shape), np.float32)  # checked as float32: no bfloat16 probe
    w = jax.ShapeDtypeStruct(tuple(w_shape), np.float32)
    cfg = plan(x, w, strides, padding, dimension_numbers=_NHWC_DN)
    if not isinstance(cfg, ConvConfig):
        raise OneDNNUnavailable(cfg)
    oh, ow = _out_spatial(cfg, tuple(x_shape[1:3]), tuple(w_shape[:2]))
    n, h, wd, c = x_shape
    kh, kw, _, o = w_shape
    geom = (n, c, h, wd, o, kh, kw, oh, ow, *cfg.strides, *cfg.dilation, *cfg.pad_lo, *cfg.pad_hi,
            DTYPE_CODES[dtype], DTYPE_CODES[out_dtype])
    arr = (ctypes.c_int64 * len(geom))(*geom)
    buf = ctypes.create_string_buffer(512)
    rc = _load().fermsca_onednn_impl_info(list(TARGETS).index(kind), arr, buf, len(buf))
    text = buf.value.decode()
    if rc != 0:
        raise RuntimeError(text)
    return text


@functools.cache
def bfloat16_reason() -> str | None:
    """None when oneDNN has a JIT bfloat16 convolution on this CPU for all three kinds (AVX-512 and
    up); otherwise why not (e.g. an AVX2 CPU: no primitive). oneDNN's reference kernels, where it
    falls back to them, are far slower than XLA, so they count as unsupported."""
    try:
        # The calls `conv_general_dilated` makes: a bfloat16 or float32 forward output; gradients
        # in bfloat16.
        impls = {(kind, np.dtype(out).name): impl_info(kind, (2, 8, 8, 16), (3, 3, 16, 16),
                                                        dtype=jnp.bfloat16, out_dtype=out)
                 for kind, out in (("fwd", jnp.bfloat16), ("fwd", np.float32),
                                   ("bwd_data", jnp.bfloat16), ("bwd_weights", jnp.bfloat16))}
    except (OneDNNUnavailable, RuntimeError) as e:
        return f"oneDNN bfloat16 convolution unavailable: {e}"
    slow = {kind: impl for kind, impl in impls.items() if impl.startswith("ref")}
    if slow:
        return f"oneDNN has no native bfloat16 convolution on this CPU ({slow})"
    return None
