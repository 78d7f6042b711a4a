"""Weak and strong scaling of train-step throughput over 1, 2, 4 and 8 devices.

    python -m experiments.paper.scaling --quick            # simulated CPU devices, narrow model, ~7 min
    python -m experiments.paper.scaling                    # simulated CPU devices, the paper's FERNet
    python -m experiments.paper.scaling --backend gpu      # the first N visible GPUs, N = 1, 2, 4, 8

Each device count runs in its own process (XLA_FLAGS must be set before JAX starts) and times the
compiled, sharded train step with `fermsca.bench.benchmark`. Strong scaling keeps the global batch
fixed; weak scaling keeps the per-device batch fixed. Writes scaling.json, table.md and scaling.png
to experiments/results/scaling/<quick|full>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.paper import common

STUDY_NAME = "scaling"
DEVICE_COUNTS = (1, 2, 4, 8)
RECORD_PREFIX = "SCALING_RECORD "
NO_DEVICES_EXIT = 3
# (global batch for strong scaling, per-device batch for weak scaling, seconds per measurement)
BUDGETS = {"quick": (64, 16, 5.0), "full": (128, 128, 20.0)}

SIMULATED_NOTE = (
    "What simulated devices can and cannot show: every device here is an XLA host-platform device "
    "carved out of the same CPU cores (`XLA_FLAGS=--xla_force_host_platform_device_count=N`), "
    "which other processes on this machine may be using too. The runs check that the sharded "
    "code path (batch split over a 1-D mesh, replicated state, gradients and BatchNorm statistics "
    "reduced over the global batch) compiles and runs at every device count, and they show what "
    "that path costs: the extra work of splitting the step and reducing across devices. They "
    "cannot show speedup. The total compute is fixed by the shared cores, so the best possible "
    "outcome is flat throughput in strong scaling (efficiency 1/N) and flat throughput at N times "
    "the work in weak scaling; anything below that is overhead. Real scaling needs N physical "
    "accelerators: `--backend gpu`."
)


def _device_env(backend: str, devices: int, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    if backend == "cpu":
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    else:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(devices)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:devices])
    return env


def efficiencies(records: Sequence[dict]) -> list[dict]:
    """Adds speedup (throughput over that of the fewest devices of the same kind of scaling) and
    efficiency (speedup per device ratio) to each record; 1.0 is perfect scaling."""
    out = []
    for kind in ("strong", "weak"):
        rows = sorted((r for r in records if r["scaling"] == kind), key=lambda r: r["devices"])
        if not rows:
            continue
        base = rows[0]
        for r in rows:
            speedup = r["images_per_second"] / base["images_per_second"]
            out.append({**r, "speedup": speedup,
                        "efficiency": speedup / (r["devices"] / base["devices"])})
    return out


def table(records: Sequence[dict], mode: str, heading_level: int = 2,
          plot: Path | None = None, relative_to: Path | None = None) -> str:
    rows = efficiencies(records)
    headers = ["Scaling", "Devices", "Global batch", "Per-device batch", "img/s", "Step ms",
               "Speedup", "Efficiency", "Compile s"]
    cells = [[r["scaling"], r["devices"], r["global_batch"], r["global_batch"] // r["devices"],
              f"{r['images_per_second']:.1f}", f"{r['step_ms']:.1f}", f"{r['speedup']:.2f}",
              f"{r['efficiency']:.2f}", f"{r['compile_seconds']:.1f}"] for r in rows]
    first = records[0]
    host = first.get("host", {})
    simulated = first.get("backend") == "cpu"
    setup = (f"{first['device_kind']} devices ({'simulated on ' if simulated else ''}"
             f"{host.get('cpu_count', '?')} host cores), model widths {tuple(first['widths'])}, "
             f"stem {first['stem_width']}, {first['dtype']}, each measured over "
             f"{min(r['seconds'] for r in records):.1f}-{max(r['seconds'] for r in records):.1f} s "
             f"after compilation and warm-up, 1-minute load average "
             f"{min(r['load_average'] for r in records):.1f}-"
             f"{max(r['load_average'] for r in records):.1f} before the runs")
    hashes = "#" * heading_level
    command = f"python -m experiments.paper.scaling{' --quick' if mode == 'quick' else ''}"
    if not simulated:
        command += " --backend gpu"
    text = (f"{hashes} Scaling of the train step ({mode})\n\n`{command}`\n\nSetup: {setup}. "
            "Speedup is throughput over the 1-device run of the same kind; efficiency is speedup "
            "per device (1.00 is perfect scaling).\n\n" + common.markdown_table(headers, cells))
    if plot is not None and relative_to is not None:
        text += "\n" + f"![scaling]({Path(os.path.relpath(plot, relative_to)).as_posix()})\n"
    if simulated:
        text += "\n" + SIMULATED_NOTE + "\n"
    return text


def plot(records: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = efficiencies(records)
    fig, (ax_ips, ax_eff) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for kind, marker in (("strong", "o"), ("weak", "s")):
        rs = [r for r in rows if r["scaling"] == kind]
        if not rs:
            continue
        n = [r["devices"] for r in rs]
        line, = ax_ips.plot(n, [r["images_per_second"] for r in rs], marker=marker,
                            label=f"{kind} (global batch {'fixed' if kind == 'strong' else 'N x'} "
                                  f"{rs[0]['global_batch']})")
        ideal = [rs[0]["images_per_second"] * d / rs[0]["devices"] for d in n]
        ax_ips.plot(n, ideal, "--", color=line.get_color(), alpha=0.5,
                    label=f"{kind}, linear (separate hardware)")
        ax_eff.plot(n, [r["efficiency"] for r in rs], marker=marker, label=kind)
    if records[0]["backend"] == "cpu":
        ax_eff.plot(DEVICE_COUNTS, [1 / d for d in DEVICE_COUNTS], ":", color="gray",
                    label="1/N: best case on shared cores")
    for ax in (ax_ips, ax_eff):
        ax.set_xscale("log", base=2)
        ax.set_xticks(DEVICE_COUNTS, [str(d) for d in DEVICE_COUNTS])
        ax.set_xlabel("devices")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_ips.set(ylabel="train images / s", title="throughput")
    ax_eff.set(ylabel="efficiency", title="scaling efficiency (1 = perfect)", ylim=(0, 1.1))
    kind = records[0]["device_kind"]
    fig.suptitle(f"FERNet train step on {'simulated ' if records[0]['backend'] == 'cpu' else ''}"
                 f"{kind} devices")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _worker(args: argparse.Namespace) -> None:
    """Runs in a child process with the device count already set in the environment."""
    import jax

    from fermsca import bench

    if jax.device_count() != args.worker_devices:
        print(f"wanted {args.worker_devices} devices, JAX sees {jax.device_count()}", file=sys.stderr)
        sys.exit(NO_DEVICES_EXIT)
    config = _config(args.quick, args.dtype)
    record = bench.benchmark(config, args.global_batch, args.seconds)
    record.update(widths=list(config.model.widths), stem_width=config.model.stem_width)
    print(RECORD_PREFIX + json.dumps(record), flush=True)


def _config(quick: bool, dtype: str):
    from configs import ferplus

    config = ferplus.get_config()  # the paper's FERNet, optimiser, loss and augmentation
    if quick:
        config.model.stem_width = common.QUICK_BUDGET["synthetic_faces"]["model.stem_width"]
        config.model.widths = common.QUICK_BUDGET["synthetic_faces"]["model.widths"]
    config.model.dtype = dtype
    return config


def measure(backend: str, devices: int, global_batch: int, seconds: float, quick: bool,
            dtype: str) -> dict | None:
    """One benchmark in a fresh process; None when fewer than `devices` devices exist."""
    cmd = [sys.executable, "-m", "experiments.paper.scaling", "--worker", "--worker_devices", str(devices),
           "--global_batch", str(global_batch), "--seconds", str(seconds), "--dtype", dtype]
    if quick:
        cmd.append("--quick")
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=common.REPO, env=_device_env(backend, devices, os.environ),
                          capture_output=True, text=True)
    if proc.returncode == NO_DEVICES_EXIT:
        return None
    if proc.returncode:
        raise common.RunError(f"scaling worker ({devices} devices, batch {global_batch}) exited with "
                              f"{proc.returncode}:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RECORD_PREFIX)]
    if not lines:
        raise common.RunError(f"scaling worker printed no record:\n{proc.stdout[-2000:]}")
    return annotate(json.loads(lines[-1][len(RECORD_PREFIX):]), backend, devices, load)


def annotate(record: dict, backend: str, devices: int, load_average: float) -> dict:
    """A `fermsca.bench.benchmark` record with what the tables need under stable names."""
    if record["device_count"] != devices:
        raise common.RunError(f"benchmark ran on {record['device_count']} devices, expected {devices}")
    return {**record, "backend": backend, "devices": devices, "global_batch": record["batch_size"],
            "load_average": load_average}


def _save(out: Path, command: str, records: Sequence[dict]) -> None:
    """Writes the measurements so far (a failure later loses none of them)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scaling.json", "w") as f:
        json.dump({"command": command.strip(), "records": list(records)}, f, indent=2)


def markdown(mode: str, relative_to: Path, heading_level: int = 2,
             results_root: Path = common.RESULTS) -> str | None:
    path = results_root / STUDY_NAME / mode / "scaling.json"
    if not path.is_file():
        return None
    records = common.load_json(path)["records"]
    png = path.with_name("scaling.png")
    return table(records, mode, heading_level, png if png.is_file() else None, relative_to)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m experiments.paper.{STUDY_NAME}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="narrow model, short measurements")
    parser.add_argument("--backend", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: N simulated host devices; gpu: the first N visible GPUs")
    parser.add_argument("--devices", type=int, nargs="*", help="device counts (default 1 2 4 8)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--table_only", action="store_true",
                        help="only rewrite table.md and scaling.png from scaling.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker_devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--global_batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    mode = "quick" if args.quick else "full"
    strong_batch, per_device, seconds = BUDGETS[mode]
    seconds = args.seconds or seconds
    counts = args.devices or list(DEVICE_COUNTS)
    out = common.RESULTS / STUDY_NAME / mode
    command = "python -m experiments.paper.scaling " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.table_only:
        _write_outputs(out, common.load_json(out / "scaling.json")["records"], mode)
        return
    records = []
    for kind in ("strong", "weak"):
        for n in counts:
            batch = strong_batch if kind == "strong" else per_device * n
            record = measure(args.backend, n, batch, seconds, args.quick, args.dtype)
            if record is None:
                print(f"{kind} {n} devices: not available on this machine, skipped")
                continue
            record["scaling"] = kind
            records.append(record)
            _save(out, command, records)
            print(f"{kind} {n} device(s), global batch {batch}: "
                  f"{record['images_per_second']:.1f} img/s ({record['step_ms']:.1f} ms/step)",
                  flush=True)
    if not records:
        raise SystemExit("no measurements")
    _write_outputs(out, records, mode)


def _write_outputs(out: Path, records: Sequence[dict], mode: str) -> None:
    plot(records, out / "scaling.png")
    (out / "table.md").write_text(table(records, mode, 1, out / "scaling.png", out))
    print(f"-> {out / 'table.md'}")


if __name__ == "__main__":
    main()
