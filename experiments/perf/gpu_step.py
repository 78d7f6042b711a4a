"""Train-step speed on whatever backend is present, and what it means for 200 FER+ epochs:
`python -m experiments.perf.gpu_step [--quick] [--output FILE]`.

For each batch size (128, 1024) and compute dtype (float32, bfloat16) it times `train.Trainer`'s
train step as the training loop runs it: the paper's FERNet, optimiser, loss and on-device
augmentation (`--config`, default configs/ferplus.py) on a training split of `--train_images`
synthetic FER+-shaped examples (uint8 48x48x1 noise, 8 classes; no dataset is read), or with `--data
config` on the config's own training split (e.g. the built-in synthetic faces of configs/default.py).
Each case runs each feed of `--feeds`, as `config.data_on_device` chooses them:
  host    the tf.data pipeline gathers every batch on the host (`input_pipeline.train_iterator`) and
          each call sends the batches' images and targets;
  device  the split is placed on the device once (`Trainer.put_train_split`), each call sends the
          batches' int32 indices (`input_pipeline.train_index_iterator`) and the step gathers them;
each with one step per call (`steps_per_dispatch` 1) and K steps per call (`--steps_per_dispatch`,
default 1,16; `Trainer.train_chunk`, one `lax.scan`). It records the first call (compilation), then img/s
over `--seconds` after `--warmup` calls (timed with `jax.block_until_ready`), in `--rounds` interleaved
rounds (median), and the projected training time of `--epochs` epochs of the split:
train_images / img/s * epochs (evaluation excluded). A JSON record goes to `--output`
(default experiments/results/bench/gpu_step_<backend>.json).

On a GPU (sized to finish within 4 minutes on one H200, compilation included: a feed and K that would
start after `--budget_seconds`, 150 s, are recorded as skipped; not yet timed on a GPU):

    pip install -e '.[cuda]'
    python -m experiments.perf.gpu_step

The device feed needs neither TensorFlow nor tensorflow_datasets (jax with CUDA, flax, optax,
orbax-checkpoint, numpy, ml_collections, clu, absl): where they are missing, run
`python -m experiments.perf.gpu_step --feeds device`; `--feeds host` says it needs TensorFlow.

`--quick` (a tiny model, batch 8, float32, K 1 and 2, a split of 256, short windows; flags given still
count) checks the script on a CPU in about half a minute, most of it compilation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import types

import jax

from fermsca import bench, cli, config_schema, datasets, hostenv, input_pipeline, perf, train
from fermsca.perf import hugepages

FERPLUS_TRAIN_IMAGES = 28709  # FER2013's training set, the images FER+ relabels
NUM_CLASSES = 8
FEEDS = ("host", "device")


def synthetic_split(num_images: int, seed: int = 0) -> types.SimpleNamespace:
    """A training split of `num_images` uint8 [48, 48, 1] noise images with one-hot targets [8]."""
    images, targets = bench.random_batch(num_images, NUM_CLASSES, seed=seed)
    return types.SimpleNamespace(images=images, targets=targets, sample_labels=False)


def check_host_feed() -> None:
    """The host feed's tf.data pipeline needs TensorFlow; the device feed does not."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise cli.ConfigError("--feeds host needs TensorFlow for its tf.data pipeline (pip install "
                              "tensorflow); --feeds device does not") from None


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


def _caller(trainer: train.Trainer, batches, data, k: int):
    """One call of the loop: the next `k` batches of `batches`, one step or one scan of k."""
    if k == 1:
        return lambda s: trainer.train(s, next(batches), data)[0]
    return lambda s: trainer.train_chunk(s, [next(batches) for _ in range(k)], data)[0]


def measure_case(config, split, num_classes: int, batch_size: int, dtype: str, feeds: list[str],
                 ks: list[int], *, seconds: float, warmup: int, rounds: int, epochs: int,
                 deadline: float = float("inf")) -> list[dict]:
    """One Trainer (config at `batch_size`, `dtype`): a record per feed in `feeds` and K in `ks`.
    A (feed, K) not compiled by `deadline` (`time.perf_counter()`) is recorded as skipped."""
    if time.perf_counter() > deadline:
        return [{"batch_size": batch_size, "dtype": dtype, "feed": feed, "steps_per_dispatch": k,
                 "skipped": "--budget_seconds spent"} for feed in feeds for k in ks]
    config = config.copy_and_resolve_references()
    config.batch_size = batch_size
    config.model.dtype = dtype
    train_images = len(split.images)
    trainer = train.Trainer(config, num_classes,
                            steps_per_epoch=input_pipeline.steps_per_epoch(train_images, batch_size),
                            mesh=train.make_mesh())
    state = trainer.init_state()
    callers, records, skipped = {}, {}, []
    for feed in feeds:
        if feed == "device":
            data, iterator = trainer.put_train_split(split), input_pipeline.train_index_iterator
        else:
            data, iterator = None, input_pipeline.train_iterator
        batches = iterator(split, global_batch_size=batch_size, seed=config.seed)
        for k in ks:
            case = {"batch_size": batch_size, "dtype": dtype, "feed": feed, "steps_per_dispatch": k}
            if time.perf_counter() > deadline:
                skipped.append({**case, "skipped": "--budget_seconds spent"})
                continue
            callers[feed, k] = _caller(trainer, batches, data, k)
            state, _, compile_s = _timed(callers[feed, k], state, 1, 0)  # compiles, then runs once
            if warmup:
                state, _, _ = _timed(callers[feed, k], state, warmup, 0)
            records[feed, k] = {**case, "first_call_seconds": compile_s, "rounds": []}
    for _ in range(rounds):  # interleaved, so a slower stretch of a shared machine hits every case
        for (feed, k), call in callers.items():
            state, calls, elapsed = _timed(call, state, None, seconds)
            records[feed, k]["rounds"].append(calls * k * batch_size / elapsed)
    out = []
    for record in records.values():
        img_s = statistics.median(record["rounds"])
        out.append({**record, "images_per_second": img_s, "step_ms": 1000 * batch_size / img_s,
                    "projected_hours": train_images / img_s * epochs / 3600})
    return out + skipped


def run(argv: list[str] | None = None) -> dict:
    """Parses `argv` (None: the command line), measures, writes and returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ferplus.py")
    parser.add_argument("--batch_sizes", default="128,1024")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps_per_dispatch", default="1,16", help="the K to compare")
    parser.add_argument("--feeds", default=",".join(FEEDS),
                        help="host (tf.data batches) and/or device (the split on the device, indices)")
    parser.add_argument("--data", choices=("random", "config"), default="random",
                        help="random: --train_images noise images; config: the config's training split")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per K and round")
    parser.add_argument("--warmup", type=int, default=2, help="calls after the first, not timed")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--train_images", type=int, default=FERPLUS_TRAIN_IMAGES,
                        help="size of the --data random split")
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
    feeds = args.feeds.split(",")
    if not feeds or not set(feeds) <= set(FEEDS):
        raise cli.ConfigError(f"--feeds {args.feeds}: host and/or device")
    if "host" in feeds:
        check_host_feed()
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= {"float32", "bfloat16"}:
        raise cli.ConfigError(f"--dtypes {args.dtypes}: float32 and/or bfloat16")
    config = bench.load_config(args.config)
    if args.quick:
        config.model.stem_width, config.model.widths = 8, (8,)
    for b in batch_sizes:
        config_schema.check_batch_size("batch_size", b, jax.device_count(), jax.process_count())
    if args.data == "config":
        data = datasets.load(config.dataset, required=("train",))
        split, num_classes = data.splits["train"], len(data.class_names)
    else:
        split, num_classes = synthetic_split(args.train_images), NUM_CLASSES
    train_images = len(split.images)

    device = jax.devices()[0]
    results = []
    for batch_size in batch_sizes:
        for dtype in dtypes:
            for r in measure_case(config, split, num_classes, batch_size, dtype, feeds, ks,
                                  seconds=args.seconds, warmup=args.warmup, rounds=args.rounds,
                                  epochs=args.epochs, deadline=started + args.budget_seconds):
                results.append(r)
                head = (f"batch {r['batch_size']:5d} {r['dtype']:8s} {r['feed']:6s} "
                        f"K={r['steps_per_dispatch']:<3d}")
                if "skipped" in r:
                    print(f"{head} skipped: {r['skipped']}", flush=True)
                    continue
                print(f"{head} {r['images_per_second']:10.1f} img/s  {r['step_ms']:8.2f} ms/step  "
                      f"first call {r['first_call_seconds']:6.1f} s  -> {args.epochs} epochs of "
                      f"{train_images} images: {r['projected_hours']:.2f} h", flush=True)
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
        "data": args.data if args.data == "random" else f"config ({config.dataset.name} train split)",
        "train_images": train_images,
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
