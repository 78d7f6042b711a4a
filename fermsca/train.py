"""Training and evaluation: TrainState, pure train/eval steps, and the loop that owns I/O.

One code path for 1 CPU, simulated CPU devices, N GPUs and M hosts: the steps are `jax.jit`-compiled
over a 1-D device `Mesh` ("data"), the batch is sharded along it with `NamedSharding` and the state is
replicated, so BatchNorm statistics and gradients are over the global batch. Each process feeds its
own slice of the global batch (`jax.make_array_from_process_local_data`). What a run records about
itself (results.json, figures, versions, host) is `run_record`'s.

Steps per dispatch. With `config.steps_per_dispatch` K > 1 the loop stacks K batches into one array
[K, B, ...] (one host-to-device transfer) and runs K train steps in one compiled call (`train_steps`,
a `jax.lax.scan` of `train_step`), so a fast accelerator is not held back by dispatching every step
from the host. The steps are the same: same batches, keys, schedule and per-step metrics. Epoch
ends, `checkpoint_every_steps` and the end of the run fall between dispatches: where fewer than K
steps are left before one, they run one at a time (`dispatch_sizes`), so a run compiles the scan
and the single step, and never pads or wastes a step. Logging and the non-finite check read the
per-step metrics (`_StepMetrics`); pre-emption is honoured between dispatches.

Training split on the device. With `config.data_on_device` ("auto": on a GPU or TPU) the training
split (uint8 images, float32 targets) is placed on the devices once (`Trainer.put_train_split`),
whole on every device: a batch's examples are a random draw from the split, so a device holding only
a shard of it would have to fetch most of its rows from the others, while a full copy makes the
gather local. Each step then sends only its indices (and drawn FER+ classes;
`input_pipeline.train_index_iterator`) and the jitted step, or the scan of K steps, gathers the batch
(`indexed_train_step`): the same batches as the host pipeline's, so the same training. With several
processes every process places the whole split on its own devices (the replicated array is built
from each process's full copy, `jax.make_array_from_process_local_data`) and feeds its part of each
global batch's indices, as it would feed its part of the images. A split larger than
`input_pipeline.DEVICE_MEMORY_SHARE` of a device's free memory stays on the host ("auto", logged) or
stops the run ("on"); all processes take the same path.

Weight averaging (beyond the paper). With `config.ema_decay` d > 0 the state is an `EMATrainState`
whose `ema` holds an exponential moving average of the parameters and of the BatchNorm statistics,
ema <- d_t * ema + (1 - d_t) * new after step t (counting from 0; `optax.incremental_update`), started
at the initial weights, with the decay warmed up as TensorFlow's `ExponentialMovingAverage` does with
`num_updates`: d_t = min(d, (1 + t) / (10 + t)) (`ema_decay_at`), so early steps do not leave the
average stuck near the random initial weights (with d = 0.999 and no warm-up, 0.999^250 = 78% of it is
still the initialisation after 250 steps). Evaluation, the best checkpoint's selection and inference
use it (`model_variables`, `checkpoint.load_checkpoint`).
"""


import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fermsca import (
    augment,
    checkpoint,
    cli,
    config_schema,
    datasets,
    input_pipeline,
    losses,
    models,
    perf,
    run_record,
    schedules,
)

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree of arrays (checkpointed as is)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class EMATrainState(TrainState):
    """A TrainState that also keeps `ema`: {"params", "batch_stats"} averaged over the steps."""

    ema: Any


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy
    nonfinite: metrics.Average.from_output("nonfinite")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient."""


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_size: int = 48, ema: bool = False) -> TrainState:
    """The initial state; with `ema` an `EMATrainState` whose average starts at the initial weights."""
    variables = model.init(rng, jnp.zeros((1, image_size, image_size, 1), jnp.float32),
                           train=False)
    params = variables["params"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
    if not ema:
        return state
    return EMATrainState(step=state.step, params=state.params, batch_stats=state.batch_stats,
                         opt_state=state.opt_state,
                         ema=jax.tree.map(jnp.copy, model_variables(state)))


def model_variables(state: TrainState) -> dict:
    """The weights that evaluation and inference use: the EMA where the state keeps one."""
    ema = getattr(state, "ema", None)
    return ema if ema is not None else {"params": state.params, "batch_stats": state.batch_stats}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def ema_decay_at(step: jax.Array | int, decay: float) -> jax.Array:
    """The average's decay at update `step` (0 for the first): min(decay, (1 + step) / (10 + step)),
    TensorFlow's `ExponentialMovingAverage` warm-up with `num_updates` = step."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable,
               augment_config: Any, label_smoothing: float = 0.0,
               class_weights: jax.Array | None = None,
               ema_decay: float = 0.0) -> tuple[TrainState, TrainMetrics]:
    """One optimisation step on a global batch {"image": uint8 [B,48,48,1], "target": [B,K]}.

    Augmentation runs on device with a key derived from (rng, step). A step whose loss or gradients
    are not finite leaves the state unchanged and is counted in `nonfinite`; the loop stops the run.

    Beyond the paper: `label_smoothing` a trains on (1 - a) * target + a / K,
    `augment_config.mixup_alpha` > 0 mixes examples (`augment.mixup`), and `class_weights` [K]
    weight each example's loss by its target distribution's class weight (`losses.class_weights`).
    The metrics keep the targets' classes. With `ema_decay` d > 0 (an `EMATrainState`) the average
    moves to d_t * ema + (1 - d_t) * (new params and BatchNorm statistics), d_t = `ema_decay_at`.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    aug_rng, dropout_rng = jax.random.split(step_rng)
    images = augment.augment(aug_rng, batch["image"], augment_config)
    targets = batch["target"]
    train_targets = optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets
    if augment_config.mixup_alpha:
        images, train_targets = augment.mixup(jax.random.fold_in(aug_rng, 1), images, train_targets,
                                              augment_config.mixup_alpha)

    def loss_and_aux(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        weights = None if class_weights is None else train_targets @ class_weights
        per_example = loss_fn(logits, train_targets, weights)
        return jnp.mean(per_example), (logits, per_example, updates.get("batch_stats", {}))

    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)
    (loss, (logits, per_example, batch_stats)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if ema_decay:
        new_state = new_state.replace(ema=optax.incremental_update(
            {"params": params, "batch_stats": batch_stats}, state.ema,
            1.0 - ema_decay_at(state.step, ema_decay)))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    labels = jnp.argmax(targets, axis=-1).astype(jnp.int32)
    step_metrics = TrainMetrics.single_from_model_output(
        loss=per_example, logits=logits, labels=labels,
        nonfinite=jnp.logical_not(ok).astype(jnp.float32)[None])
    return new_state, step_metrics


def train_steps(state: TrainState, batches: dict[str, jax.Array], rng: jax.Array, *,
                step: Callable) -> tuple[TrainState, TrainMetrics]:
    """`step` (`train_step` with its keywords bound) over batches stacked on a leading axis
    [K, B, ...], in one `jax.lax.scan`: the state after the K steps and each step's metrics [K]."""
    return jax.lax.scan(lambda s, batch: step(s, batch, rng), state, batches)


def indexed_train_step(state: TrainState, data: dict[str, jax.Array], indices: dict[str, jax.Array],
                       rng: jax.Array, *, step: Callable) -> tuple[TrainState, TrainMetrics]:
    """`step` on the batch that `indices` ({"index": int32 [B], "class"?: int32 [B]}) select from
    `data`, the training split on the device ({"image": uint8 [N, H, W, C], "target": [N, K]})."""
    return step(state, input_pipeline.gather_batch(data["image"], data["target"], indices), rng)


def indexed_train_steps(state: TrainState, data: dict[str, jax.Array], indices: dict[str, jax.Array],
                        rng: jax.Array, *, step: Callable) -> tuple[TrainState, TrainMetrics]:
    """`indexed_train_step` over index batches stacked [K, B], in one `jax.lax.scan`."""
    return train_steps(state, indices, rng,
                       step=lambda s, i, r: indexed_train_step(s, data, i, r, step=step))


def dispatch_sizes(start: int, stop: int, steps_per_epoch: int, steps_per_dispatch: int,
                   checkpoint_every_steps: int = 0) -> Iterator[int]:
    """Steps of each dispatch from step `start` to `stop`: `steps_per_dispatch` at a time, and one
    at a time where fewer are left before an epoch end, a multiple of `checkpoint_every_steps` or
    `stop`, so that each of those falls between two dispatches."""
    step = start
    while step < stop:
        boundary = min(stop, (step // steps_per_epoch + 1) * steps_per_epoch)
        if checkpoint_every_steps:
            boundary = min(boundary, (step // checkpoint_every_steps + 1) * checkpoint_every_steps)
        size = steps_per_dispatch if boundary - step >= steps_per_dispatch else 1
        yield size
        step += size


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              loss_fn: Callable, num_classes: int) -> tuple[EvalMetrics, jax.Array]:
    """Metrics and a [K, K] confusion matrix (true, predicted) over the unmasked examples, of the
    state's `model_variables` (its EMA where it keeps one)."""
    images = augment.preprocess(batch["image"])
    logits = model.apply(model_variables(state), images, train=False)
    mask = batch["mask"]
    labels = jnp.argmax(batch["target"], axis=-1).astype(jnp.int32)
    preds = jnp.argmax(logits, axis=-1)
    confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[labels, preds].add(mask)
    step_metrics = EvalMetrics.single_from_model_output(
        loss=loss_fn(logits, batch["target"]), logits=logits, labels=labels, mask=mask)
    return step_metrics, confusion


def make_mesh() -> jax.sharding.Mesh:
    # Auto axes: the compiler propagates shardings from the inputs (batch sharded, state replicated).
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's slice of a global batch as global arrays under `sharding` (the step's input)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class Trainer:
    """Compiled steps for one model/config over a mesh. `model` (default: FERNet from config.model
    on this machine's fast building blocks, `perf.building_blocks`) and `donate` (the train step
    reuses the state's buffers) are for benchmarks; `class_weights` [K] weight the training loss.

    `train_step` is one step; `train_steps` runs `config.steps_per_dispatch` steps in one call
    (`train_chunk`). Their `indexed_` twins take index batches and gather them from the training
    split on the device (`put_train_split`). With `config.ema_decay` > 0 the state keeps an EMA of
    the weights."""

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int,
                 mesh: jax.sharding.Mesh, *, model: nn.Module | None = None, donate: bool = True,
                 class_weights: np.ndarray | None = None):
        self.config = config
        self.num_classes = num_classes
        self.mesh = mesh
        self.model = model or models.from_config(config.model, num_classes,
                                                 **perf.building_blocks(config.model))
        self.schedule = schedules.create_schedule(config.optimizer, steps_per_epoch,
                                                  config.num_epochs)
        self.tx = schedules.create_optimizer(config.optimizer, steps_per_epoch, config.num_epochs,
                                             schedule=self.schedule)
        self.loss_fn = losses.get(config.loss)
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
        self.chunk_sharding = NamedSharding(mesh, P(None, DATA_AXIS))  # [K, B, ...]: B over devices
        self.rng = jax.random.key(config.seed)

        init = functools.partial(create_train_state, model=self.model, tx=self.tx,
                                 ema=bool(config.ema_decay))
        self._init = jax.jit(init, out_shardings=self.replicated)
        step = functools.partial(train_step, model=self.model, tx=self.tx, loss_fn=self.loss_fn,
                                 augment_config=config.augment, label_smoothing=config.label_smoothing,
                                 class_weights=class_weights, ema_decay=config.ema_decay)
        donate_argnums = (0,) if donate else ()
        self.train_step = jax.jit(
            step, in_shardings=(self.replicated, self.batch_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated), donate_argnums=donate_argnums)
        self.train_steps = jax.jit(
            functools.partial(train_steps, step=step),
            in_shardings=(self.replicated, self.chunk_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated), donate_argnums=donate_argnums)
        # The split replicated, the indices split over the devices as a batch is: a local gather.
        self.indexed_train_step = jax.jit(
            functools.partial(indexed_train_step, step=step),
            in_shardings=(self.replicated, self.replicated, self.batch_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated), donate_argnums=donate_argnums)
        self.indexed_train_steps = jax.jit(
            functools.partial(indexed_train_steps, step=step),
            in_shardings=(self.replicated, self.replicated, self.chunk_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated), donate_argnums=donate_argnums)
        self.eval_step = jax.jit(
            functools.partial(eval_step, model=self.model, loss_fn=self.loss_fn,
                              num_classes=num_classes),
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated))

    def init_state(self) -> TrainState:
        return self._init(jax.random.fold_in(self.rng, 1))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and (replicated) shardings of the state: the restore target, so a run can
        resume on another device count than the one that saved it."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
            jax.eval_shape(self.init_state))

    def place(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.replicated)

    def put_train_split(self, split: Any) -> dict[str, jax.Array]:
        """The split's {"image": uint8 [N, H, W, C], "target": float32 [N, K]}, whole on every device
        of the mesh (each process passes its full copy), for `train(..., data=)`."""
        arrays = {"image": np.asarray(split.images), "target": np.asarray(split.targets, np.float32)}
        return {k: jax.make_array_from_process_local_data(self.replicated, v, v.shape)
                for k, v in arrays.items()}

    def train(self, state: TrainState, batch: dict[str, np.ndarray],
              data: dict[str, jax.Array] | None = None):
        """One step on this process's part of a global batch; with `data` (`put_train_split`) the
        batch is a `train_index_iterator` item, gathered from `data` on the device."""
        batch = global_batch(batch, self.batch_sharding)
        rng = jax.random.fold_in(self.rng, 2)
        if data is None:
            return self.train_step(state, batch, rng)
        return self.indexed_train_step(state, data, batch, rng)

    def train_chunk(self, state: TrainState, batches: list[dict[str, np.ndarray]],
                    data: dict[str, jax.Array] | None = None):
        """`len(batches)` steps in one call (`train_steps`): the state and per-step metrics [K].
        With `data` the batches are index batches, as in `train`."""
        stacked = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
        stacked = global_batch(stacked, self.chunk_sharding)
        rng = jax.random.fold_in(self.rng, 2)
        if data is None:
            return self.train_steps(state, stacked, rng)
        return self.indexed_train_steps(state, data, stacked, rng)

    def evaluate(self, state: TrainState, split: Any, batch_size: int) -> dict:
        """Loss, accuracy and confusion matrix over every example of `split` exactly once."""
        total, confusion = None, None
        for batch in input_pipeline.eval_iterator(split, global_batch_size=batch_size):
            m, cm = self.eval_step(state, global_batch(batch, self.batch_sharding))
            total = m if total is None else total.merge(m)
            confusion = cm if confusion is None else confusion + cm
        computed = total.compute()
        return {"loss": float(computed["loss"]), "accuracy": float(computed["accuracy"]),
                "confusion_matrix": np.asarray(jax.device_get(confusion)).round().astype(int)}


class _ThroughputTimer:
    """Images per second over timed stretches of training (started after compilation)."""

    def __init__(self):
        self.images, self.seconds, self._since, self._started = 0, 0.0, None, False

    def start(self, state: Any) -> None:
        jax.block_until_ready(state)
        self._started, self._since = True, time.perf_counter()

    def count(self, images: int) -> None:
        if self._since is not None:
            self.images += images

    def pause(self, state: Any) -> None:
        if self._since is not None:
            jax.block_until_ready(state)
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        if self._started:
            self._since = time.perf_counter()

    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds else None


class _StepMetrics:
    """The train metrics of a run of steps, left on the device until they are read.

    `add` takes a step's `TrainMetrics` (index None) or step `index` of a dispatch's stacked
    metrics [K]; `compute` fetches them and merges them in step order, as the merges on the device
    of one step at a time would (float32 sums, then the means on the device)."""

    def __init__(self):
        self._steps: list[tuple[TrainMetrics, int | None]] = []

    def add(self, step_metrics: TrainMetrics, index: int | None = None) -> None:
        self._steps.append((step_metrics, index))

    def compute(self) -> dict[str, float]:
        fetched = jax.device_get([m for m, _ in self._steps])
        rows = [m if i is None else jax.tree.map(lambda x, i=i: x[i], m)
                for m, (_, i) in zip(fetched, self._steps, strict=True)]
        merged = functools.reduce(lambda a, b: a.merge(b), rows)
        return {k: float(v) for k, v in jax.tree.map(jnp.asarray, merged).compute().items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, validates every epoch, checkpoints, and writes results.json and figures to `workdir`.

    Returns the results dict ("status" is "completed" or "preempted"). A dataset without a
    validation split (CK+ `protocol="all"`, every image in train) trains without validation or a
    best checkpoint, and nothing is evaluated at the end ("evaluated_split" None).
    """
    start_time = time.time()
    config_schema.validate(config, jax.device_count(), jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    is_chief = jax.process_index() == 0
    writer, report_progress = _metric_writer(workdir, is_chief)

    train_on_all = config.dataset.protocol == "all"  # CK+ only (config_schema)
    data = datasets.load(config.dataset, required=("train",) if train_on_all else ("train", "validation"))
    validation = data.splits.get("validation")
    logging.info("dataset %s:\n%s", data.name, datasets.describe(data))
    train_split = data.splits["train"]
    num_train = len(train_split.images)
    steps_per_epoch = input_pipeline.steps_per_epoch(num_train, config.batch_size)
    num_steps = steps_per_epoch * config.num_epochs
    if config.max_steps:
        num_steps = min(num_steps, config.max_steps)
    num_classes = len(data.class_names)

    class_weights = None
    if config.class_weighting:
        class_weights = losses.class_weights(train_split.targets.sum(axis=0), config.class_weighting)
        logging.info("class weights (class_weighting=%s): %s", config.class_weighting,
                     ", ".join(f"{n} {w:.2f}" for n, w in zip(data.class_names, class_weights, strict=True)))
    trainer = Trainer(config, num_classes, steps_per_epoch, mesh, class_weights=class_weights)
    ckpts = checkpoint.RunCheckpoints(workdir, keep=config.keep_checkpoints,
                                      asynchronous=config.async_checkpoints)
    try:
        history: list[dict] = []
        warnings: list[str] = []
        restored = ckpts.restore_latest(trainer.abstract_state())
        earlier_seconds = 0.0  # the wall time of the processes before this one, up to ...
        counted_from = 0  # ... the step from which it is known (a checkpoint may predate the count)
        if restored is None:
            if ckpts.set_aside:
                warnings.append(
                    f"no usable checkpoint in {workdir}: {len(ckpts.set_aside)} corrupt "
                    f"one(s) moved to {ckpts.aside_dir} (steps {sorted(ckpts.set_aside)}); training "
                    "starts again from step 0")
                logging.warning("%s", warnings[-1])
            state = trainer.init_state()
        else:  # a resumed run never needs the fresh initialisation
            state, meta = restored
            state = trainer.place(state)
            history = list(meta.get("history", []))
            logging.info("resumed from step %d (epoch %s)", int(state.step), meta.get("epoch"))
            if "wall_time_seconds" in meta:
                earlier_seconds = float(meta["wall_time_seconds"])
                counted_from = int(meta.get("wall_time_counted_from_step", 0))
            else:
                counted_from = int(state.step)
            if counted_from:
                warnings.append(
                    f"wall_time_seconds counts only the time since step {counted_from}: the "
                    "checkpoint resumed from there did not record the time before it")
        start_step = int(state.step)

        def wall_time() -> float:
            """The run's wall time: every earlier process's up to the checkpoint resumed from,
            plus this one's (the work lost after a process's last checkpoint is not counted)."""
            return earlier_seconds + time.time() - start_time

        leg = (start_step, time.time())  # this process's start, for progress.json's pace
        meta_base = {"config": config.to_json(), "class_names": list(data.class_names),
                     "dataset": data.name}
        env = run_record.environment() if is_chief else {}  # for progress.json, taken once

        def save(step: int, epoch: float, val_accuracy: float | None) -> None:
            if step in ckpts.latest.all_steps():  # e.g. SIGTERM right after an end-of-epoch save
                return
            ckpts.save(step, state, {**meta_base, "epoch": epoch, "history": history,
                                     "wall_time_seconds": wall_time(),
                                     "wall_time_counted_from_step": counted_from},
                       val_accuracy=val_accuracy)

        writer.write_hparams(run_record.hparams(config))
        progress = report_progress(num_train_steps=num_steps, writer=writer,
                                   every_steps=config.log_every_steps)
        train_data = _device_train_split(config, trainer, train_split)
        batches = input_pipeline.train_iterator if train_data is None else \
            input_pipeline.train_index_iterator
        train_iter: Iterator = batches(train_split, global_batch_size=config.batch_size,
                                       seed=config.seed, start_step=start_step)
        logging.info("training %d steps (%d per epoch) from step %d on %d %s device(s), %d process(es)",
                     num_steps, steps_per_epoch, start_step, jax.device_count(),
                     jax.devices()[0].device_kind, jax.process_count())

        status = "completed"
        train_metrics, epoch_metrics = _StepMetrics(), _StepMetrics()
        # Training throughput over the dispatches after each function's first (compilation),
        # evaluation excluded.
        timer = _ThroughputTimer()
        compiled: set[int] = set()
        step = start_step
        with cli.Preemption() as preemption:
            for size in dispatch_sizes(start_step, num_steps, steps_per_epoch,
                                       config.steps_per_dispatch, config.checkpoint_every_steps):
                first_call = size not in compiled
                if first_call:
                    timer.pause(state)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    if size == 1:
                        state, m = trainer.train(state, next(train_iter), train_data)
                    else:
                        state, m = trainer.train_chunk(state, [next(train_iter) for _ in range(size)],
                                                       train_data)
                if first_call:
                    compiled.add(size)
                    timer.start(state)
                else:
                    timer.count(size * config.batch_size)
                for i in range(size):
                    train_metrics.add(m, None if size == 1 else i)
                    epoch_metrics.add(m, None if size == 1 else i)
                    step += 1
                    progress(step)
                    if step % config.log_every_steps == 0 or step % steps_per_epoch == 0 or \
                            step == num_steps:
                        computed = train_metrics.compute()
                        _check_finite(computed, step, ckpts)
                        writer.write_scalars(step, {
                            "train_loss": computed["loss"], "train_accuracy": computed["accuracy"],
                            "learning_rate": float(trainer.schedule(step - 1))})
                        train_metrics = _StepMetrics()
                # `dispatch_sizes` ends a dispatch at every epoch end and checkpoint step.
                done = step == num_steps
                if step % steps_per_epoch == 0 or done:
                    timer.pause(state)
                    epoch = step / steps_per_epoch
                    train_epoch = epoch_metrics.compute()
                    epoch_metrics = _StepMetrics()
                    val = None
                    if validation is not None:
                        val = trainer.evaluate(state, validation, config.eval_batch_size)
                        writer.write_scalars(step, {"validation_loss": val["loss"],
                                                    "validation_accuracy": val["accuracy"]})
                    history.append(run_record.epoch_row(round(epoch, 4), train_epoch, val,
                                                        float(trainer.schedule(step - 1))))
                    logging.info("epoch %.2f: train loss %.4f acc %.4f | %s", epoch,
                                 train_epoch["loss"], train_epoch["accuracy"],
                                 "no validation split" if val is None else
                                 f"validation loss {val['loss']:.4f} acc {val['accuracy']:.4f}")
                    stalled = run_record.stall_warning(
                        history, None if val is None else val["confusion_matrix"], data.class_names)
                    if stalled:
                        logging.warning("%s", stalled)
                        if stalled not in warnings:
                            warnings.append(stalled)
                    epoch_index = step // steps_per_epoch
                    if done or epoch_index % config.checkpoint_every_epochs == 0:
                        save(step, epoch, None if val is None else val["accuracy"])
                    if is_chief:
                        run_record.write_progress(workdir, config, "running", step, num_steps,
                                                  steps_per_epoch, history, env, leg)
                    timer.resume()
                elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                    save(step, step / steps_per_epoch, None)
                if not done and preemption.any_process():
                    save(step, step / steps_per_epoch, None)
                    status = "preempted"
                    break
        timer.pause(state)
        ckpts.wait()
        writer.flush()
        if is_chief:
            run_record.write_progress(workdir, config, status, int(state.step), num_steps,
                                      steps_per_epoch, history, env, leg)
        if status == "preempted":
            ckpts.close()
            logging.warning("preempted at step %d; rerun with the same --workdir to resume",
                            int(state.step))
            return {"status": status, "step": int(state.step)}

        eval_name, evaluations = _evaluate_checkpoints(config, data, trainer, state, ckpts,
                                                       steps_per_epoch)
        if is_chief:
            run_record.write_figures(workdir, data, eval_name, evaluations, history)
        results = run_record.results(config, data, eval_name, evaluations, history, num_steps,
                                     steps_per_epoch, models.count_params(state.params))
        results.update({
            "warnings": warnings,
            "status": status,
            "wall_time_seconds": wall_time(),
            "resumed_from_step": start_step or None,
            "train_images_per_second": timer.images_per_second(),
            "train_data_on_device": train_data is not None,
        })
        ckpts.close()
        if is_chief:
            run_record.write_results(workdir, results)
        writer.close()
        return results
    except BaseException:
        ckpts.close()  # finish pending saves and stop the writer threads before the error exits
        raise


class _LogWriter:
    """The metric writer where clu's cannot load (it imports TensorFlow for TensorBoard): scalars
    and hyperparameters go to the log; results.json holds every epoch's metrics either way."""

    def write_scalars(self, step: int, scalars: dict) -> None:
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))

    def write_hparams(self, hparams: dict) -> None:
        logging.info("hyperparameters: %s", hparams)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _metric_writer(workdir: str, is_chief: bool) -> tuple[Any, Callable]:
    """(writer, progress-reporter factory): clu's TensorBoard writer and `ReportProgress`, or, where
    TensorFlow is missing (a lent GPU machine), `_LogWriter` and no progress reports."""
    try:
        from clu import metric_writers, periodic_actions  # TensorBoard's writer imports TensorFlow
    except ImportError as error:
        logging.warning("no TensorBoard metrics (%s): scalars go to the log and results.json", error)
        return _LogWriter(), lambda **kwargs: (lambda step: None)
    return (metric_writers.create_default_writer(workdir, just_logging=not is_chief),
            periodic_actions.ReportProgress)


def _device_train_split(config: ml_collections.ConfigDict, trainer: Trainer, split: Any
                        ) -> dict[str, jax.Array] | None:
    """The training split on the devices where `config.data_on_device` asks for it and it fits;
    None: batches come from the host pipeline."""
    if not input_pipeline.data_on_device(config.data_on_device, jax.default_backend()):
        return None
    nbytes = np.asarray(split.images).nbytes + np.asarray(split.targets, np.float32).nbytes
    problem = input_pipeline.device_memory_problem(
        nbytes, [d.memory_stats() for d in jax.local_devices()])
    if jax.process_count() > 1:  # the two paths compile different steps: every process takes one
        fits = multihost_utils.process_allgather(np.int32(problem is None))
        if problem is None and not np.all(fits):
            problem = "the training split does not fit on another process's devices"
    if problem:
        if config.data_on_device == "on":
            raise cli.ConfigError(f"config.data_on_device='on': {problem}; set it to 'auto' or 'off' "
                                  "to feed batches from the host")
        logging.info("config.data_on_device=%r: %s; batches come from the host pipeline",
                     config.data_on_device, problem)
        return None
    logging.info("training split on the device: %d examples, %.1f MiB on each device",
                 len(split.images), nbytes / 2**20)
    return trainer.put_train_split(split)


def _check_finite(computed: dict, step: int, ckpts: checkpoint.RunCheckpoints) -> None:
    if float(computed["nonfinite"]) > 0 or not np.isfinite(float(computed["loss"])):
        ckpts.wait()
        last = ckpts.latest.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss or gradient before step {step}; the run is stopped. "
            f"Last good checkpoint: {'none' if last is None else f'step {last}'} in "
            f"{ckpts.latest.directory}. Lower the learning rate or check the data.")


def _evaluate_checkpoints(config, data, trainer: Trainer, state, ckpts, steps_per_epoch
                          ) -> tuple[str | None, dict[str, dict]]:
    """Evaluates the best and last checkpoints on test (validation if there is no test split, or
    with `config.evaluate_test` off); returns that split's name and {"best"?, "last": evaluation},
    or (None, {}) when there is neither (every image in train)."""
    eval_name = "test" if ("test" in data.splits and config.evaluate_test) else "validation"
    if eval_name not in data.splits:
        return None, {}
    eval_split = data.splits[eval_name]
    candidates = [("last", state)]
    best = ckpts.restore_best(trainer.abstract_state())
    if best is not None:
        best_state, _ = best
        candidates.insert(0, ("best", trainer.place(best_state)))
    evaluations = {}
    for name, s in candidates:
        result = trainer.evaluate(s, eval_split, config.eval_batch_size)
        evaluations[name] = run_record.evaluation(result, data.class_names, int(s.step),
                                                  steps_per_epoch)
    return eval_name, evaluations
