"""CK+ cross-validation with the folds trained together, vmapped (`fermsca.crossval`), and its speed.

    # The paper's CK+ setup (configs/ckplus.py: batch 7, 200 epochs, Table 1), 10 folds in one process:
    python -m experiments.paper.ckplus_cv --config configs/ckplus.py --workdir runs/ck_cv \\
        --config.dataset.manual_dir=/data/CK+48
    python -m experiments.paper.ckplus_cv ... --folds 0-4                 # some folds
    # Speed: K folds vmapped against one fold's step K times over (random data, after compilation):
    python -m experiments.paper.ckplus_cv --config configs/ckplus.py --bench --folds all --bench_steps 20 \
        --bench_variants=single_xla,single_onednn,folds_xla,folds_onednn,folds_grouped

A study writes <workdir>/fold_k/results.json per fold and <workdir>/summary.json (mean +- sample std
over folds, pooled per-class accuracy, the confusion matrix summed over folds); rerunning the same
command resumes from the last epoch's checkpoint. The reported checkpoint is the last epoch's.
SIGTERM stops a study within a step (exit status 75); the rerun redoes the interrupted epoch.
"""

from __future__ import annotations

import json
import time

from absl import app, flags, logging
from ml_collections import config_flags

from fermsca import cli, hostenv
from fermsca.perf import hugepages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/ckplus.py", "Training config file.")
flags.DEFINE_string("workdir", None, "Directory of the study: checkpoints, per-fold results, summary.")
flags.DEFINE_string("folds", "all", "Test folds (either protocol): all, 0-4, 0,3.")
flags.DEFINE_bool("bench", False, "Time the vmapped step against one fold's step instead of training.")
flags.DEFINE_list("bench_variants", ["single_xla", "single_onednn", "folds_xla", "folds_onednn"],
                  "Benchmark variants (see `benchmark`); also folds_grouped.")
flags.DEFINE_integer("bench_steps", 20, "Timed steps of each benchmark variant.")
flags.DEFINE_string("bench_output", None, "Write the benchmark record as JSON here.")
flags.DEFINE_string("compilation_cache", hostenv.default_compilation_cache(),
                    "JAX's persistent compilation cache directory ('off' disables it).")


def _time_steps(step, state, args, steps: int) -> tuple[float, object]:
    """Seconds per call of `step(state, *args)` over `steps` calls, after a compiling call and one
    warm-up call; returns (seconds, last state)."""
    import jax

    for _ in range(2):
        state, _ = step(state, *args)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = step(state, *args)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps, state


VARIANTS = ("single_xla", "single_onednn", "folds_xla", "folds_onednn", "folds_grouped")


def benchmark(config, num_folds: int, steps: int, variants=VARIANTS) -> dict:
    """Seconds per train step on random batches of `config.batch_size` (CK+, 7 classes), `steps` timed
    steps per variant after compilation; data loading not timed. Variants:

      single_<impl>: one fold, `train.Trainer.train` (the lone run), convolutions on <impl>;
      folds_<impl>: `num_folds` folds in one vmapped step (`crossval.fold_steps`), each fold's
        convolutions on <impl> (`crossval.fold_conv`);
      folds_grouped: the same with XLA's own batching (one grouped convolution over the folds).

    oneDNN variants are skipped where oneDNN cannot run. Speed-ups compare a folds_* step with
    `num_folds` single_* steps one after another.
    """
    import jax
    import numpy as np

    from fermsca import bench, crossval, perf, train

    num_classes = 7  # CK+
    batch = config.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_folds, batch, 48, 48, 1), dtype=np.uint8)
    targets = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, (num_folds, batch))]
    record = {"batch_size": batch, "folds": num_folds, "timed_steps": steps,
              "model_widths": list(config.model.widths), "stem_width": config.model.stem_width,
              "cpu": bench.cpu_model(), "device_kind": jax.devices()[0].device_kind,
              "hugepage_malloc": hugepages.active(), "jax": jax.__version__}
    onednn = perf.resolve_conv_impl("auto") == "onednn"
    for variant in variants:
        kind, impl = variant.split("_")
        if impl == "onednn" and not onednn:
            continue
        variant_config = config.copy_and_resolve_references()
        variant_config.model.conv_impl = "onednn" if impl == "onednn" else "xla"
        if kind == "single":
            trainer = train.Trainer(variant_config, num_classes, steps_per_epoch=1000,
                                    mesh=train.make_mesh())
            seconds, _ = _time_steps(trainer.train, trainer.init_state(),
                                     ({"image": images[0], "target": targets[0]},), steps)
            record[variant] = {"step_ms": 1000 * seconds, "steps_per_second": 1 / seconds,
                               "images_per_second": batch / seconds, "convolutions": impl}
        else:
            fold_steps = crossval.fold_steps(variant_config, num_classes,
                                             per_fold_convs=impl != "grouped")
            seeds = [variant_config.seed] * num_folds
            args = ({"image": images, "target": targets}, crossval.train_keys(seeds),
                    np.full(num_folds, 1000, np.int32), np.ones(num_folds, bool))
            seconds, _ = _time_steps(fold_steps.train, crossval.init_folds(fold_steps, seeds), args,
                                     steps)
            record[variant] = {"step_ms": 1000 * seconds, "fold_steps_per_second": num_folds / seconds,
                               "images_per_second": num_folds * batch / seconds,
                               "convolutions": fold_steps.convolutions}
        logging.info("%s: %.1f ms/step", variant, record[variant]["step_ms"])
    for folded in [v for v in record if v.startswith("folds_")]:
        for single in [v for v in record if v.startswith("single_")]:
            sequential = num_folds * record[single]["step_ms"]
            record[f"speedup_{folded}_vs_{single}"] = sequential / record[folded]["step_ms"]
    return record


def _print_bench(record: dict) -> None:
    k, b = record["folds"], record["batch_size"]
    print(f"{record['cpu']}, batch {b}, widths {tuple(record['model_widths'])}, {k} folds, "
          f"{record['timed_steps']} timed steps each")
    for key in [v for v in record if v.startswith(("single_", "folds_"))]:
        r = record[key]
        line = (f"  {key} ({r['convolutions']}): {r['step_ms']:.1f} ms/step, "
                f"{r['images_per_second']:.1f} img/s")
        if key.startswith("single_"):
            line += f"; x{k} one after another: {k * r['step_ms']:.1f} ms"
        print(line)
    for key in [v for v in record if v.startswith("speedup_")]:
        print(f"  {key.removeprefix('speedup_')}: {record[key]:.2f}x")


def _run(argv) -> int:
    from experiments.paper import common
    from fermsca import crossval

    hostenv.enable_compilation_cache(FLAGS.compilation_cache)
    config = FLAGS.config
    folds = common.parse_folds(FLAGS.folds, int(config.dataset.num_folds))
    if FLAGS.bench:
        unknown = sorted(set(FLAGS.bench_variants) - set(VARIANTS))
        if unknown:
            raise app.UsageError(f"--bench_variants: unknown {unknown}; expected among {list(VARIANTS)}")
        record = benchmark(config, len(folds), FLAGS.bench_steps, FLAGS.bench_variants)
        _print_bench(record)
        if FLAGS.bench_output:
            from fermsca import bench

            bench.write_json(FLAGS.bench_output, record)
        return 0
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (unless --bench)")
    summary = crossval.train_folds(config, folds, FLAGS.workdir)
    print(f"{summary['evaluated_split']} accuracy {summary['accuracy_mean']:.4f} ± "
          f"{summary['accuracy_std']:.4f} over {len(folds)} folds "
          f"({json.dumps(summary['accuracy_per_fold'])}) -> {FLAGS.workdir}/summary.json")
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.raise_on_sigterm()  # until crossval.train_folds takes SIGTERM over (then: stop after the step)
    return cli.run(lambda: _run(argv))


if __name__ == "__main__":
    hugepages.ensure()
    app.run(main)
