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
and it gets there by arithmetic, not by replaying k steps.
"""

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from absl import logging

# Threads for one pipeline's tf.data work. Gathering a batch of 48x48 images takes tens of
# microseconds, so a couple of threads keep far ahead of any train step and leave the host's cores
# to the accelerator runtime.
_TF_DATA_THREADS = 2
_NO_END = np.iinfo(np.int64).max


def _keep_tf_off_accelerators() -> None:
    """Hides GPUs from TensorFlow so it neither claims their memory nor competes with JAX."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; what it holds stays held.
        if tf.config.get_visible_devices("GPU"):
            logging.warning("TensorFlow was initialised before the input pipeline and sees GPUs.")


def _options() -> tf.data.Options:
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


def sample_classes(targets: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw of one class per row of `targets` from uniforms in [0, 1). -> int32 [N]."""
    cdf = np.cumsum(targets.astype(np.float64), axis=1)  # [N, K]
    threshold = uniforms[:, None] * cdf[:, -1:]  # scaled so rows need not sum to one exactly
    classes = np.sum(cdf <= threshold, axis=1)
    return np.minimum(classes, targets.shape[1] - 1).astype(np.int32)


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
    index, count, batch = _process_shard(global_batch_size, process_index, process_count)
    images, targets = _check_split(split)
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed and start_step must be non-negative, got {seed}, {start_step}")
    num_examples, num_classes = targets.shape
    steps = steps_per_epoch(num_examples, global_batch_size)
    first_epoch, first_offset = divmod(start_step, steps)
    sample = bool(split.sample_labels)

    def epoch_plan(epoch: np.int64) -> tuple[np.ndarray, np.ndarray]:
        """This process's example indices [S, b] and drawn classes [S, b] for one epoch."""
        epoch = int(epoch)
        order = np.random.default_rng([seed, epoch, 0]).permutation(num_examples)
        order = order[: steps * global_batch_size].reshape(steps, global_batch_size)
        order = order[first_offset if epoch == first_epoch else 0 :]
        order = order[:, index * batch : (index + 1) * batch]
        if sample:
            uniforms = np.random.default_rng([seed, epoch, 1]).random(num_examples)
            classes = sample_classes(targets[order.ravel()], uniforms[order.ravel()])
            classes = classes.reshape(order.shape)
        else:
            classes = np.zeros(order.shape, np.int32)
        return order.astype(np.int64), classes

    def plan_op(epoch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        order, classes = tf.numpy_function(epoch_plan, [epoch], (tf.int64, tf.int32))
        order.set_shape([None, batch])
        classes.set_shape([None, batch])
        return order, classes

    _keep_tf_off_accelerators()
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
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
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

    _keep_tf_off_accelerators()
    images_t = tf.constant(images)
    targets_t = tf.constant(targets)

    def gather(order: tf.Tensor, mask: tf.Tensor) -> dict[str, tf.Tensor]:
        return {
            "image": tf.gather(images_t, order),
            "target": tf.gather(targets_t, order),
            "mask": mask,
        }

    ds = tf.data.Dataset.from_tensor_slices((order, real.astype(np.float32)))
    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
    return ds.as_numpy_iterator()
