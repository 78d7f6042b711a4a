"""XLA vs oneDNN on the network's convolutions: `python -m experiments.perf.onednn_conv_bench`.

For each convolution of FERNet (batch 128, float32, NHWC / HWIO, stride 1 SAME) it times, jitted and
after compilation, the forward pass and forward + backward (`value_and_grad` of <y, r> w.r.t. both the
input and the kernel) on XLA's CPU convolution (`lax.conv_general_dilated`) and on the oneDNN custom
calls (`fermsca.perf.onednn_conv`), and, where PyTorch is installed, on PyTorch eager channels_last (the
same oneDNN family: `torch.nn.functional.conv2d`, forward under `no_grad`, forward + backward for
input and weight gradients). Each timing is the median over `--rounds` interleaved rounds of the
median of `--iters` calls, so a load spike from another process hits both paths alike; the load
average before and after is recorded. Prints a table and writes JSON to --output. Like the other
benchmarks it restarts itself once with huge-page malloc (`fermsca.perf.hugepages`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fermsca import bench, hostenv
from fermsca.perf import hugepages, onednn_conv

OUTPUT = Path(__file__).resolve().parents[1] / "results" / "bench" / "onednn_conv.json"
NHWC = ("NHWC", "HWIO", "NHWC")

# (name, H=W, C_in, C_out, kernel, how many times the network has it)
SHAPES = [
    ("stem 3x3 1->64 @48", 48, 1, 64, 3, 1),
    ("b1 1x1 64->16 @24", 24, 64, 16, 1, 2),
    ("b1 3x3 64->16 @24", 24, 64, 16, 3, 1),
    ("b1 5x5 64->16 @24", 24, 64, 16, 5, 1),
    ("b1 3x3 64->64 @24", 24, 64, 64, 3, 1),
    ("b2 1x1 64->32 @12", 12, 64, 32, 1, 2),
    ("b2 3x3 64->32 @12", 12, 64, 32, 3, 1),
    ("b2 5x5 64->32 @12", 12, 64, 32, 5, 1),
    ("b2 3x3 128->128 @12", 12, 128, 128, 3, 1),
    ("b2 1x1 64->128 @12", 12, 64, 128, 1, 1),
    ("b3 1x1 128->64 @6", 6, 128, 64, 1, 2),
    ("b3 3x3 128->64 @6", 6, 128, 64, 3, 1),
    ("b3 5x5 128->64 @6", 6, 128, 64, 5, 1),
    ("b3 3x3 256->256 @6", 6, 256, 256, 3, 1),
    ("b3 1x1 128->256 @6", 6, 128, 256, 1, 1),
]


def _functions(conv):
    def fwd(x, w):
        return conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    def loss(x, w, r):
        return jnp.vdot(fwd(x, w), r)

    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _torch_functions(x: np.ndarray, w: np.ndarray, r: np.ndarray, k: int):
    """PyTorch eager channels_last forward and forward + backward of the same convolution."""
    import torch

    def nchw(a):  # NHWC array -> NCHW-shaped tensor stored channels_last (the same bytes order)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).contiguous(
            memory_format=torch.channels_last)

    xt, rt = nchw(x), nchw(r)
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).contiguous(
        memory_format=torch.channels_last)
    xg, wg = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return torch.nn.functional.conv2d(xt, wt, padding=k // 2)

    def fwd_bwd():
        xg.grad = wg.grad = None
        torch.nn.functional.conv2d(xg, wg, padding=k // 2).backward(rt)
        return xg.grad, wg.grad

    return fwd, fwd_bwd


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _median_ms(fn, args, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_shape(batch, hw, cin, cout, k, rounds, iters, with_torch: bool) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
    r = jnp.asarray(rng.standard_normal((batch, hw, hw, cout)), jnp.float32)
    paths = {"xla": _functions(lax.conv_general_dilated),
             "onednn": _functions(onednn_conv.conv_general_dilated)}
    args = {"fwd": (x, w), "fwd_bwd": (x, w, r)}
    if with_torch:
        torch_fwd, torch_fwd_bwd = _torch_functions(*(np.asarray(a) for a in (x, w, r)), k)
        paths["pytorch"] = (lambda *_: (torch_fwd(), None)[1], lambda *_: (torch_fwd_bwd(), None)[1])
    runs = {(p, m): [] for p in paths for m in ("fwd", "fwd_bwd")}
    for fwd, fwd_bwd in paths.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(fwd(*args["fwd"]))
            jax.block_until_ready(fwd_bwd(*args["fwd_bwd"]))
    for _ in range(rounds):
        for p, (fwd, fwd_bwd) in paths.items():
            runs[(p, "fwd")].append(_median_ms(fwd, args["fwd"], iters))
            runs[(p, "fwd_bwd")].append(_median_ms(fwd_bwd, args["fwd_bwd"], iters))
    out = {f"{p}_{m}_ms": statistics.median(v) for (p, m), v in runs.items()}
    out["runs_ms"] = {f"{p}_{m}": v for (p, m), v in runs.items()}
    out["onednn_impl"] = {
        kind: onednn_conv.impl_info(kind, x.shape, w.shape) for kind in ("fwd", "bwd_data", "bwd_weights")
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--output", default=str(OUTPUT), help="JSON path; empty to skip writing.")
    args = parser.parse_args()

    reason = onednn_conv.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"oneDNN fast path unavailable: {reason}")
    shapes = SHAPES
    load_before = os.getloadavg()
    begin = time.perf_counter()
    rows = []
    with_torch = _torch_available()
    if with_torch:
        import torch

        torch.set_num_threads(os.cpu_count())
    header = (f"{'convolution':28s} {'xla fwd':>8s} {'dnnl fwd':>8s} {'x':>5s}   "
              f"{'xla f+b':>8s} {'dnnl f+b':>8s} {'x':>5s}"
              + (f"   {'torch fwd':>9s} {'torch f+b':>9s}" if with_torch else ""))
    info = onednn_conv.build_info()
    print(f"batch {args.batch}, ms (median of {args.rounds} rounds x {args.iters} calls); oneDNN "
          f"{info['onednn_version']} ({info['onednn_cpu_runtime']}), {bench.cpu_model()}")
    print(header)
    for name, hw, cin, cout, k, count in shapes:
        row = dict(name=name, hw=hw, c_in=cin, c_out=cout, kernel=k, count_in_network=count,
                   **bench_shape(args.batch, hw, cin, cout, k, args.rounds, args.iters, with_torch))
        rows.append(row)
        print(f"{name:28s} {row['xla_fwd_ms']:8.2f} {row['onednn_fwd_ms']:8.2f} "
              f"{row['xla_fwd_ms'] / row['onednn_fwd_ms']:5.2f}   {row['xla_fwd_bwd_ms']:8.2f} "
              f"{row['onednn_fwd_bwd_ms']:8.2f} {row['xla_fwd_bwd_ms'] / row['onednn_fwd_bwd_ms']:5.2f}"
              + (f"   {row['pytorch_fwd_ms']:9.2f} {row['pytorch_fwd_bwd_ms']:9.2f}" if with_torch else ""),
              flush=True)
    keys = ["xla_fwd_ms", "onednn_fwd_ms", "xla_fwd_bwd_ms", "onednn_fwd_bwd_ms"]
    keys += ["pytorch_fwd_ms", "pytorch_fwd_bwd_ms"] if with_torch else []
    totals = {key: sum(r[key] * r["count_in_network"] for r in rows) for key in keys}
    print(f"{'network total':28s} {totals['xla_fwd_ms']:8.2f} {totals['onednn_fwd_ms']:8.2f} "
          f"{totals['xla_fwd_ms'] / totals['onednn_fwd_ms']:5.2f}   {totals['xla_fwd_bwd_ms']:8.2f} "
          f"{totals['onednn_fwd_bwd_ms']:8.2f} {totals['xla_fwd_bwd_ms'] / totals['onednn_fwd_bwd_ms']:5.2f}"
          + (f"   {totals['pytorch_fwd_ms']:9.2f} {totals['pytorch_fwd_bwd_ms']:9.2f}" if with_torch else ""))
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"{time.perf_counter() - begin:.0f} s")

    record = {
        "command": "python -m experiments.perf.onednn_conv_bench",
        "batch": args.batch,
        "rounds": args.rounds,
        "iters": args.iters,
        "rows": rows,
        "network_total": totals,
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "onednn": onednn_conv.build_info(),
        "torch": importlib.metadata.version("torch") if with_torch else None,
        "hugepage_malloc": hugepages.active(),
        "cpu_model": bench.cpu_model(),
        "cpu_isa": hostenv.cpu()["isa"],
        "cpu_count": os.cpu_count(),
        "threads_available": len(os.sched_getaffinity(0)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "seconds": time.perf_counter() - begin,
    }
    if args.output:
        bench.write_json(args.output, record)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    hugepages.ensure()
    main()
