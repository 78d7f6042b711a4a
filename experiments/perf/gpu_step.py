"""Train-step speed on whatever backend is present, and what it means for 200 FER+ epochs:
`python -m experiments.perf.gpu_step [--quick] [--output FILE]`.

For each batch size (128, 1024) and compute dtype (float32, bfloat16) it times `train.Trainer`'s
train step as the training loop runs it: the paper's FERNet, optimiser, loss and on-device
augmentation (`--config`, default configs/ferplus.py), fed synthetic FER+-shaped host batches (uint8
48x48x1 faces, 8 classes; no dataset is read), each batch sent to the device as the loop sends it.
Each case runs one step per call (`steps_per_dispatch` 1) and K steps per call (`--steps_per_dispatch`,
default 1,16; `Trainer.train_chunk`, one `lax.scan`). It records the first call (compilation), then img/s over
`--seconds` after `--warmup` calls (timed with `jax.block_until_ready`), in `--rounds` interleaved
rounds (median), and the projected training time of `--epochs` epochs of `--train_images` images:
train_images / img/s * epochs (evaluation excluded). A JSON record goes to `--output`
(default experiments/results/bench/gpu_step_<backend>.json).

On a GPU (sized to finish within 4 minutes on one H200, compilation included: a case that would
start after `--budget_seconds`, 150 s, is recorded as skipped; not yet timed on a GPU):

    pip install -e '.[cuda]'
    python -m experiments.perf.gpu_step

`--quick` (a tiny model, batch 8, float32, K 1 and 2, short windows; flags given still count) checks
the script on a CPU in about half a minute, most of it compilation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import jax
import numpy as np

from fermsca import bench, cli, config_schema, hostenv, perf, train
from fermsca.perf import hugepages

FERPLUS_TRAIN_IMAGES = 28709  # FER2013's training set, the images FER+ relabels
NUM_CLASSES = 8


def host_batches(count: int, batch_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` distinct synthetic batches {"image": uint8 [B, 48, 48, 1], "target": one-hot [B, 8]}."""
    out = []
    for i in range(count):
        images, targets = bench.random_batch(batch_size, NUM_CLASSES, seed=seed + i)
        out.append({"image": images, "target": targets})
    return out


def _timed(call, state, calls: int | None, seconds: float):
    """Runs `state = call(state)` for `seconds` (at least 2 calls) or exactly `calls` times;
    returns (state, calls, elapsed seconds) after blocking on the last state."""
    jax.block_until_ready(state)
    done, start = 0, time.perf_counter()
    while (done < calls) if calls else (done < 2 or time.perf_counter() - start < seconds):
        state = call(state)
        done += 1
    jax.block_until_ready(state)
    return state, done, time.perf_counter() - start


def measure_case(config, batch_size: int, dtype: str, ks: list[int], *, seconds: float, warmup: int,
                 rounds: int, train_images: int, epochs: int) -> list[dict]:
    """One Trainer (config at `batch_size`, `dtype`): a record per K in `ks`."""
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    config.model.dtype = dtype
    trainer = train.Trainer(config, NUM_CLASSES, steps_per_epoch=max(1, train_images // batch_size),
                            mesh=train.make_mesh())
    batches = host_batches(max(ks), batch_size)
    state = trainer.init_state()

    def caller(k):
        if k == 1:
            return lambda s: trainer.train(s, batches[0])[0]
        return lambda s: trainer.train_chunk(s, batches[:k])[0]

    records = {}
    for k in ks:
        state, _, compile_s = _timed(caller(k), state, 1, 0)  # compiles, then runs once
        state, _, _ = _timed(caller(k), state, warmup, 0) if warmup else (state, 0, 0)
        records[k] = {"steps_per_dispatch": k, "first_call_seconds": compile_s, "rounds": []}
    for _ in range(rounds):  # interleaved, so a slower stretch of a shared machine hits every K
        for k in ks:
            state, calls, elapsed = _timed(caller(k), state, None, seconds)
            records[k]["rounds"].append(calls * k * batch_size / elapsed)
    out = []
    for k in ks:
        img_s = statistics.median(records[k]["rounds"])
        out.append({
            "batch_size": batch_size, "dtype": dtype, **records[k],
            "images_per_second": img_s,
            "step_ms": 1000 * batch_size / img_s,
            "projected_hours": train_images / img_s * epochs / 3600,
        })
    return out


def run(argv: list[str] | None = None) -> dict:
    """Parses `argv` (None: the command line), measures, writes and returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ferplus.py")
    parser.add_argument("--batch_sizes", default="128,1024")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps_per_dispatch", default="1,16", help="the K to compare")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per K and round")
    parser.add_argument("--warmup", type=int, default=2, help="calls after the first, not timed")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--train_images", type=int, default=FERPLUS_TRAIN_IMAGES)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--budget_seconds", type=float, default=150.0,
                        help="start no new case after this long (the rest are recorded as skipped)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and sizes: checks the script (on a CPU) in seconds")
    parser.add_argument("--output", help="JSON record (default experiments/results/bench/gpu_step_"
                                         "<backend>.json)")
    parser.add_argument("--note", default="", help="conditions of the run, kept in the record")
    parser.add_argument("--compilation_cache", default=hostenv.default_compilation_cache())
    args = parser.parse_args(argv)
    if args.quick:  # other defaults; flags given still count
        parser.set_defaults(batch_sizes="8", dtypes="float32", steps_per_dispatch="1,2", seconds=0.2,
                            warmup=1, train_images=256)
        args = parser.parse_args(argv)
    hostenv.enable_compilation_cache(args.compilation_cache)
    started = time.perf_counter()

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        ks = [int(k) for k in args.steps_per_dispatch.split(",")]
    except ValueError as e:
        raise cli.ConfigError(f"--batch_sizes / --steps_per_dispatch: comma-separated integers ({e})"
                              ) from None
    if min(batch_sizes) < 1 or min(ks) < 1:
        raise cli.ConfigError("--batch_sizes and --steps_per_dispatch must be positive")
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        raise cli.ConfigError(f"--dtypes {args.dtypes}: float32 and/or bfloat16")
    config = bench.load_config(args.config)
    if args.quick:
        config.model.stem_width, config.model.widths = 8, (8,)
    for b in batch_sizes:
        config_schema.check_batch_size("batch_size", b, jax.device_count(), jax.process_count())

    device = jax.devices()[0]
    results = []
    for batch_size in batch_sizes:
        for dtype in dtypes:
            if time.perf_counter() - started > args.budget_seconds:
                results.append({"batch_size": batch_size, "dtype": dtype,
                                "skipped": f"--budget_seconds {args.budget_seconds} spent"})
                continue
            for r in measure_case(config, batch_size, dtype, ks, seconds=args.seconds,
                                  warmup=args.warmup, rounds=args.rounds,
                                  train_images=args.train_images, epochs=args.epochs):
                results.append(r)
                print(f"batch {r['batch_size']:5d} {r['dtype']:8s} K={r['steps_per_dispatch']:<3d} "
                      f"{r['images_per_second']:10.1f} img/s  {r['step_ms']:8.2f} ms/step  "
                      f"first call {r['first_call_seconds']:6.1f} s  -> {args.epochs} epochs of "
                      f"{args.train_images} images: {r['projected_hours']:.2f} h", flush=True)
    record = {
        "command": "python -m experiments.perf.gpu_step " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": args.config,
        "note": args.note,
        "model": {"stem_width": config.model.stem_width, "widths": list(config.model.widths),
                  "conv_impl": perf.resolve_conv_impl(config.model.conv_impl, "float32")},
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": bench.cpu_model(),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "jax": jax.__version__,
        "train_images": args.train_images,
        "epochs": args.epochs,
        "seconds_per_window": args.seconds,
        "rounds": args.rounds,
        "results": results,
        "wall_seconds": time.perf_counter() - started,
    }
    output = args.output or f"experiments/results/bench/gpu_step_{jax.default_backend()}.json"
    bench.write_json(output, record)
    print(f"{record['wall_seconds']:.0f} s in all -> {output}")
    return record


def main() -> None:
    run()


if __name__ == "__main__":
    hugepages.ensure()
    sys.exit(cli.run(main))
