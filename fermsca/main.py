"""Command line: `python -m fermsca.main --config configs/default.py --workdir runs/default`.

Override any config field with `--config.<field>=<value>`. Multi-host runs call
`jax.distributed.initialize` from `--coordinator_address/--num_processes/--process_id`, or from the
cluster environment with `--distributed`.

Errors are one line on stderr with exit status 2 (`--verbose` adds the traceback); a run stopped by
SIGTERM saves a checkpoint and exits with status 75 (see `fermsca.cli`).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fermsca import cli, hostenv
from fermsca.perf import hugepages

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed from the cluster environment.")
flags.DEFINE_string("compilation_cache", hostenv.default_compilation_cache(),
                    "Directory of JAX's persistent compilation cache ('off' disables it; default "
                    f"${hostenv.CACHE_ENV} or ~/.cache/fermsca/jax).")
flags.DEFINE_bool("verbose", False, "Print the traceback of an error as well as its one line.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
    """Drops the checkpoint library's INFO chatter from the log; its warnings and errors stay."""

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def repeated_config_flags(argv: list[str]) -> list[str]:
    """`--config.<field>` overrides given more than once (a tuple field would concatenate them)."""
    seen, repeated = set(), []
    for arg in argv:
        if arg.startswith("--config."):
            name = arg.split("=", 1)[0]
            if name in seen and name not in repeated:
                repeated.append(name)
            seen.add(name)
    return repeated


def _train(argv) -> int:
    from fermsca import config_schema

    # The config's own errors first, before TensorFlow is imported and any data is built; the
    # device-dependent checks (batch sizes against the mesh) run again in train.train_and_evaluate.
    config_schema.validate(FLAGS.config)
    manual_dir = FLAGS.config.dataset.manual_dir
    if FLAGS.config.dataset.name in ("ferplus", "ckplus") and manual_dir and not os.path.isdir(manual_dir):
        # The builders check it too, but only after TensorFlow's import (seconds).
        raise NotADirectoryError(f"{os.path.abspath(manual_dir)}: manual_dir is not a folder")

    import jax

    cache = hostenv.enable_compilation_cache(FLAGS.compilation_cache)
    logging.info("compilation cache: %s", cache or "off")

    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()

    try:
        import tensorflow as tf
    except ImportError:  # a packed dataset with the split on the device needs no TensorFlow
        from fermsca import input_pipeline

        if not FLAGS.config.dataset.packed_file or not input_pipeline.data_on_device(
                FLAGS.config.data_on_device, jax.default_backend()):
            raise cli.ConfigError(
                "TensorFlow is not installed: without it, training reads a packed dataset "
                "(config.dataset.packed_file, written by python -m fermsca.datasets.packed) with the "
                "training split on the device (config.data_on_device='on'; 'auto' on a GPU)") from None
    else:
        tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX

    from fermsca import run_record, train

    logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        for warning in results.get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
    if results["status"] != "completed":
        raise cli.Preempted(f"pre-empted at step {results['step']}: a checkpoint was saved; rerun "
                            f"with --workdir {FLAGS.workdir} to resume")
    if jax.process_index() == 0:
        print(run_record.summary_line(results, os.path.join(FLAGS.workdir, "results.json")))
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    repeated = repeated_config_flags(sys.argv)
    if repeated:
        raise app.UsageError(f"{', '.join(repeated)} given more than once: give each config "
                             "override once (a tuple field would join the values)")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    cli.raise_on_sigterm()  # until the training loop takes SIGTERM over (then: save and stop)
    return cli.run(lambda: _train(argv), verbose=FLAGS.verbose)


if __name__ == "__main__":
    hugepages.ensure()
    cli.config_package_on_path(cli.flag_value(sys.argv, "config"))
    app.run(main)
