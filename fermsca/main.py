"""Command line: `python -m fermsca.main --config configs/default.py --workdir runs/default`.

Override any config field with `--config.<field>=<value>`. Multi-host runs call
`jax.distributed.initialize` from `--coordinator_address/--num_processes/--process_id`, or from the
cluster environment with `--distributed`.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from fermsca import hostenv

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed from the cluster environment.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
    """Drops the checkpoint library's INFO chatter from the log; its warnings and errors stay."""

    def filter(self, record):
        return record.levelno >= logging.logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax

    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()

    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only: leave accelerators to JAX

    from fermsca import train

    logging.info("JAX process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        if results["status"] == "completed":
            best = results["evaluations"].get("best", results["evaluations"]["last"])
            print(f"{results['evaluated_split']} accuracy {best['accuracy']:.4f} "
                  f"(macro F1 {best['macro_f1']:.4f}) -> "
                  f"{os.path.join(FLAGS.workdir, 'results.json')}")
        else:
            print(f"preempted at step {results['step']}: rerun with --workdir {FLAGS.workdir} "
                  "to resume")


if __name__ == "__main__":
    hostenv.ensure_hugepage_malloc()
    app.run(main)
