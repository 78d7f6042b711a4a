"""tf.data input pipeline: per-process shards, resumable training order, padded evaluation.

A split is any object with `images` (uint8 [N, H, W, C]), `targets` (float32 [N, K], rows summing to
one) and `sample_labels` (bool). Batches are numpy dicts; the images stay uint8, and augmentation
and standardisation run on the device (`fermsca.augment`).

Training order. Epoch e visits the examples in the order `np.random.default_rng([seed, e, 0])
.permutation(N)`; global step i of the epoch is the slice [i * G, (i + 1) * G) of it (G the global
batch size, the last N mod G examples of each epoch dropped), and process p of P takes the p-th of P
contiguous parts of that slice. With `sample_labels` (FER+ probabilistic label drawing) the one-hot
target of example j in epoch e is drawn from its target distribution with the uniform number
`np.random.default_rng([seed, e, 1]).random(N)[j]`. Everything is a function of (seed, epoch, step),
so an iterator started at `start_step=k` yields exactly what one started at 0 yields from step k on,
and it gets there by arithmetic, not by replaying k steps. `epoch_plan` is that order, the one
function both training iterators read.

Training split on the device. `train_iterator` gathers each batch on the host and the loop sends it
to the device. With the split kept on the device instead (`config.data_on_device`,
`train.Trainer.put_train_split`), `train_index_iterator` yields only the batch's int32 indices (and
drawn classes) and the jitted step gathers them (`gather_batch`): the same examples and targets, so
the same training. `data_on_device` and `device_memory_problem` decide where the split goes.

TensorFlow is imported by the function that builds the tf.data pipeline (`train_iterator`), not
with the module: the index iterator, the evaluation iterator and everything else run without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

if TYPE_CHECKING:
    import tensorflow as tf

# Threads for one pipeline's tf.data work. Gathering a batch of 48x48 images takes tens of
# microseconds, so a couple of threads keep far ahead of any train step and leave the host's cores
# to the accelerator runtime.
_TF_DATA_THREADS = 2
_NO_END = np.iinfo(np.int64).max


TF_MISSING = ("the tf.data input pipeline needs TensorFlow (pip install tensorflow); training with the "
              "split on the device (config.data_on_device) reads indices without it")


def _tensorflow():
    """The `tensorflow` module, GPUs hidden from it; ImportError saying what needs it if absent."""
    try:
        import tensorflow
    except ImportError as e:
        raise ImportError(f"{TF_MISSING} ({e})") from e
    _keep_tf_off_accelerators(tensorflow)
    return tensorflow


def _keep_tf_off_accelerators(tf) -> None:
    """Hides GPUs from TensorFlow so it neither claims their memory nor competes with JAX."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; what it holds stays held.
        if tf.config.get_visible_devices("GPU"):
            logging.warning("TensorFlow was initialised before the input pipeline and sees GPUs.")


def _options(tf) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = _TF_DATA_THREADS
    options.threading.max_intra_op_parallelism = 1
    return options


def _process_shard(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """Returns (process_index, process_count, per-process batch size), validated."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, process_count={count})")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if global_batch_size % count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the process count {count}"
        )
    return index, count, global_batch_size // count


def _check_split(split: Any) -> tuple[np.ndarray, np.ndarray]:
    images, targets = np.asarray(split.images), np.asarray(split.targets, np.float32)
    if images.ndim != 4 or targets.ndim != 2 or len(images) != len(targets):
        raise ValueError(
            f"split needs images [N, H, W, C] and targets [N, K]; got {images.shape} and "
            f"{targets.shape}"
        )
    if len(images) == 0:
        raise ValueError("split has no examples")
    return images, targets


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches in one training epoch; the remainder is dropped."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"{num_examples} examples do not fill one global batch of {global_batch_size}"
        )
    return steps


DATA_ON_DEVICE = ("auto", "on", "off")
# The training split may take at most this share of a device's free memory: the rest is for the
# model (activations, gradients, optimiser state) and the compiler's scratch space.
DEVICE_MEMORY_SHARE = 0.25


def data_on_device(setting: str, backend: str) -> bool:
    """Whether `config.data_on_device` asks for the training split on the device. "auto" is on for
    accelerators (a GPU or TPU step is short, and the host's gathering and copying would hold it
    back) and off on a CPU, whose "device" memory is host memory and where tf.data's background
    threads already gather the next batches while a step runs."""
    if setting not in DATA_ON_DEVICE:
        raise ValueError(f"data_on_device={setting!r}: expected one of {list(DATA_ON_DEVICE)}")
    return setting == "on" or (setting == "auto" and backend != "cpu")


def device_memory_problem(nbytes: int, memory_stats: list[dict | None]) -> str | None:
    """None if a split of `nbytes` (held whole by each device) fits in `DEVICE_MEMORY_SHARE` of the
    free memory of every device (their `jax.Device.memory_stats()`), else why not. A device that
    reports no limit (a CPU) is not checked."""
    for i, stats in enumerate(memory_stats):
        if not stats or not stats.get("bytes_limit"):
            continue
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if nbytes > DEVICE_MEMORY_SHARE * free:
            return (
                f"the training split needs {nbytes / 2**20:.1f} MiB on each device, more than "
                f"{DEVICE_MEMORY_SHARE:.0%} of local device {i}'s free {free / 2**20:.1f} MiB"
            )
    return None


def sample_classes(targets: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw of one class per row of `targets` from uniforms in [0, 1). -> int32 [N]."""
    cdf = np.cumsum(targets.astype(np.float64), axis=1)  # [N, K]
    threshold = uniforms[:, None] * cdf[:, -1:]  # scaled so rows need not sum to one exactly
    classes = np.sum(cdf <= threshold, axis=1)
    return np.minimum(classes, targets.shape[1] - 1).astype(np.int32)


def epoch_plan(
    targets: np.ndarray,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    sample_labels: bool,
    process_index: int,
    process_count: int,
    first_step: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One process's training plan for steps `first_step`.. of `epoch` (the module docstring's order).

    Returns:
      (example indices int32 [S, b], drawn classes int32 [S, b] or None without `sample_labels`),
      S = steps_per_epoch - first_step and b = global_batch_size / process_count.
    """
    num_examples = len(targets)
    steps = steps_per_epoch(num_examples, global_batch_size)
    batch = global_batch_size // process_count
    order = np.random.default_rng([seed, epoch, 0]).permutation(num_examples)
    order = order[: steps * global_batch_size].reshape(steps, global_batch_size)
    order = order[first_step:, process_index * batch : (process_index + 1) * batch]
    order = order.astype(np.int32)
    if not sample_labels:
        return order, None
    uniforms = np.random.default_rng([seed, epoch, 1]).random(num_examples)
    classes = sample_classes(targets[order.ravel()], uniforms[order.ravel()])
    return order, classes.reshape(order.shape)


def _epoch_plans(
    split: Any,
    global_batch_size: int,
    seed: int,
    start_step: int,
    process_index: int | None,
    process_count: int | None,
) -> tuple[Any, np.ndarray, np.ndarray, int]:
    """Validates the arguments; returns (plan of an epoch, images, targets, first epoch)."""
    index, count, _ = _process_shard(global_batch_size, process_index, process_count)
    images, targets = _check_split(split)
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed and start_step must be non-negative, got {seed}, {start_step}")
    first_epoch, first_offset = divmod(start_step, steps_per_epoch(len(targets), global_batch_size))

    def plan(epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        return epoch_plan(
            targets,
            global_batch_size=global_batch_size,
            seed=seed,
            epoch=epoch,
            sample_labels=bool(split.sample_labels),
            process_index=index,
            process_count=count,
            first_step=first_offset if epoch == first_epoch else 0,
        )

    return plan, images, targets, first_epoch


def train_index_iterator(
    split: Any,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The batches of `train_iterator` as indices into the split, for a split kept on the device.

    Same arguments, same order (both read `epoch_plan`): batch i of this iterator selects the
    examples of batch i of `train_iterator`, and with `split.sample_labels` the classes its one-hot
    targets were drawn as.

    Yields:
      {"index": int32 [b]} and, with `split.sample_labels`, "class": int32 [b].
    """
    plan, _, _, epoch = _epoch_plans(
        split, global_batch_size, seed, start_step, process_index, process_count
    )
    while True:
        order, classes = plan(epoch)
        for i in range(len(order)):
            yield {"index": order[i]} if classes is None else {"index": order[i], "class": classes[i]}
        epoch += 1


def gather_batch(images: Any, targets: Any, indices: dict[str, Any]) -> dict[str, Any]:
    """The batch that `indices` (a `train_index_iterator` item) selects from a split's images
    [N, H, W, C] and targets [N, K]: what `train_iterator` yields. Traceable (`jax.numpy` arrays in,
    gathered on the device) and NumPy alike."""
    xp = jnp if isinstance(images, jax.Array) else np
    image = xp.take(images, indices["index"], axis=0)
    if "class" in indices:
        target = xp.eye(targets.shape[1], dtype=np.float32)[indices["class"]]
    else:
        target = xp.take(targets, indices["index"], axis=0)
    return {"image": image, "target": target}


def train_iterator(
    split: Any,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of this process, from global step `start_step` on.

    Yields:
      {"image": uint8 [b, H, W, C], "target": float32 [b, K]} with b = global_batch_size /
      process_count; targets are one-hot draws when `split.sample_labels`.
    """
    plan, images, targets, first_epoch = _epoch_plans(
        split, global_batch_size, seed, start_step, process_index, process_count
    )
    _, _, batch = _process_shard(global_batch_size, process_index, process_count)
    num_classes = targets.shape[1]
    sample = bool(split.sample_labels)
    tf = _tensorflow()

    def epoch_plan_np(epoch: np.int64) -> tuple[np.ndarray, np.ndarray]:
        order, classes = plan(int(epoch))
        return order, np.zeros_like(order) if classes is None else classes

    def plan_op(epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        order, classes = tf.numpy_function(epoch_plan_np, [epoch], (tf.int32, tf.int32))
        order.set_shape([None, batch])
        classes.set_shape([None, batch])
        return order, classes

    images_t = tf.constant(images)
    targets_t = tf.constant(targets)

    def gather(order: tf.Tensor, classes: tf.Tensor) -> dict[str, tf.Tensor]:
        if sample:
            target = tf.one_hot(classes, num_classes, dtype=tf.float32)
        else:
            target = tf.gather(targets_t, order)
        return {"image": tf.gather(images_t, order), "target": target}

    ds = tf.data.Dataset.range(first_epoch, _NO_END)
    ds = ds.map(plan_op).prefetch(1)  # the next epoch's order is ready before it is needed
    ds = ds.unbatch()
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
    return ds.as_numpy_iterator()


def eval_iterator(
    split: Any,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the split in order, each example exactly once across all processes.

    The examples are padded to a whole number of global batches; every process yields the same
    number of batches, and `mask` (1 real, 0 padding) lets metrics count exactly N examples.
    Padding repeats example 0. Targets are the stored distributions (never drawn).

    Yields:
      {"image": uint8 [b, H, W, C], "target": float32 [b, K], "mask": float32 [b]}.
    """
    index, count, batch = _process_shard(global_batch_size, process_index, process_count)
    images, targets = _check_split(split)
    num_examples = len(images)
    num_batches = -(-num_examples // global_batch_size)
    position = np.arange(num_batches * global_batch_size).reshape(num_batches, global_batch_size)
    position = position[:, index * batch : (index + 1) * batch]  # [num_batches, b]
    real = position < num_examples
    order = np.where(real, position, 0)

    mask = real.astype(np.float32)
    # NumPy, not tf.data: one gather per batch, a small fraction of an evaluation step's time.
    return ({"image": images[o], "target": targets[o], "mask": m} for o, m in zip(order, mask, strict=True))
