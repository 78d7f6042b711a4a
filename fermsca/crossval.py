"""Cross-validation as one computation: the K folds of a configuration trained together by `jax.vmap`.

The paper's CK+ setup (section 3.3: batch 7, 200 epochs, Table 1 schedule) runs once per fold. At
batch 7 one step leaves a CPU (or GPU) mostly idle, so `train_folds` stacks the folds' parameter sets,
optimiser states and BatchNorm statistics along a leading fold axis and runs `train.train_step`
vmapped over them: one compiled step advances every fold, each on its own batch from its own
training split, shuffled by the input pipeline as its lone run would be, with its own augmentation
key. Fold k is trained as `python -m fermsca.main ... --config.dataset.fold=k` trains it (same seed,
initial state, data order, keys and schedule; tests/test_crossval.py pins the final parameters and
BatchNorm statistics to the single-run path), except that the reported checkpoint is the last epoch's
(no selection on the test fold).

Folds of different sizes. Fold k has S_k = N_k // batch steps per epoch (the input pipeline's rule,
remainder dropped). Every epoch of the study runs max_k S_k vmapped steps; at step i of an epoch fold
k is *active* while i < S_k. An inactive fold gets a zero batch, keeps its state (`jnp.where`), adds
nothing to the metrics and does not advance its data iterator, so each fold sees exactly its lone
run's S_k batches per epoch, and all folds end each epoch together (where checkpoints are written).
The padding costs max S / mean S - 1 of the compute: 0.4% on CK+48 (111 or 112 steps per fold).

Schedules. Table 1 is in epochs, and an epoch is S_k steps in fold k. `fold_schedule` evaluates the
configured per-epoch schedule at epoch `count // steps_per_epoch`, with each fold's steps_per_epoch
passed into the vmapped step: the lone run's schedule, step for step (both configured schedules are
constant within an epoch).

Convolutions. Vmapped with per-fold kernels, a convolution becomes XLA's grouped convolution, which
its CPU runtime runs slowly (10 CK+ folds: 0.3-0.4x the speed of the folds one after another),
and oneDNN's custom call (`conv_impl` "onednn", or "auto" on x86-64) has no batching rule
at all. On a CPU the model therefore runs each fold's convolutions separately inside the one step
(`fold_conv`), on the path `conv_impl` resolves to; GPUs keep XLA's grouped convolution.

Speed (`python -m experiments.paper.ckplus_cv --bench`: paper model, batch 7, 10 folds, on 2 cores of an
AMD EPYC shared with other jobs): one vmapped step of the 10 folds against 10 lone steps one after
another is 1.19x faster with XLA's convolutions (134 against 112 img/s) and 1.07x with oneDNN's (185
against 173 img/s); the CPU has little idle time to fill at batch 7. A GPU, idle at batch 7, should
gain far more (not measured).

Layout of `workdir`: checkpoints/<epoch>/ (one state pytree with a leading fold axis, Orbax), one
fold_k/results.json per fold (the fields `experiments.paper.common` reads), and summary.json
with mean +- sample std over folds, pooled per-class accuracy and the confusion matrix summed over
folds (also drawn as confusion_matrix.png). A killed study resumes from its last saved epoch.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from fermsca import (
    checkpoint,
    cli,
    config_schema,
    datasets,
    input_pipeline,
    losses,
    models,
    perf,
    report,
    schedules,
    train,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Folds as configs


def repeat_name(config: ml_collections.ConfigDict, fold: int) -> str:
    """'fold_k': test fold k of either protocol (subject-independent or image-level k-fold), as the
    studies of `experiments.paper.common` name a repeat."""
    del config  # both protocols name their folds alike
    return f"fold_{fold}"


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
    """The config of fold `fold` (`dataset.fold = fold`, for either protocol); everything else, the
    seed and the split seed included, as given."""
    num_folds = int(config.dataset.num_folds)
    if not 0 <= fold < num_folds:
        raise cli.ConfigError(f"fold {fold}: config.dataset.fold must be in [0, "
                              f"config.dataset.num_folds={num_folds})")
    out = config.copy_and_resolve_references()
    out.dataset.fold = int(fold)
    return out


# ------------------------------------------------------------------------------------------------
# Per-fold schedule and optimiser


def fold_schedule(optimizer_config: Any, steps_per_epoch: Any, num_epochs: int) -> optax.Schedule:
    """The learning rate at a fold's step `count`, for a steps_per_epoch that may be a traced value.

    `schedules.create_schedule` with one step per epoch, read at epoch count // steps_per_epoch.
    Both configured schedules (Table 1 and constant) are constant within an epoch, so this is the
    lone run's `create_schedule(optimizer_config, steps_per_epoch, num_epochs)` at every step.
    """
    if optimizer_config.schedule not in schedules.EPOCHWISE:
        raise cli.ConfigError(f"config.optimizer.schedule={optimizer_config.schedule!r}: cross-validation "
                              "takes the schedules that are constant within an epoch "
                              f"({', '.join(schedules.EPOCHWISE)})")
    per_epoch = schedules.create_schedule(optimizer_config, 1, num_epochs)
    return lambda count: per_epoch(count // steps_per_epoch)


def fold_optimizer(optimizer_config: Any, steps_per_epoch: Any, num_epochs: int
                   ) -> optax.GradientTransformation:
    """`schedules.create_optimizer` (Adam, the paper) on `fold_schedule`; its state has the lone
    run's structure."""
    schedule = fold_schedule(optimizer_config, steps_per_epoch, num_epochs)
    return schedules.create_optimizer(optimizer_config, 1, num_epochs, schedule=schedule)


# ------------------------------------------------------------------------------------------------
# Convolutions with per-fold kernels


def per_fold(fn: Callable) -> Callable:
    """`fn` whose vmap calls it once per index of the mapped axis, unrolled (independent calls, which
    XLA's CPU runtime may run at the same time), instead of batching the operations inside it."""
    batched = jax.custom_batching.custom_vmap(fn)

    @batched.def_vmap
    def rule(axis_size, in_batched, *args):
        outs = [fn(*[a[k] if b else a for a, b in zip(args, in_batched, strict=True)])
                for k in range(axis_size)]
        return jax.tree.map(lambda *o: jnp.stack(o), *outs), jax.tree.map(lambda _: True, outs[0])

    return batched


def fold_conv(base: Callable = lax.conv_general_dilated) -> Callable:
    """A `conv_general_dilated` for `nn.Conv` (same arguments) whose vmap over folds runs each fold's
    convolution, and its two gradient convolutions, through `base` as the fold's lone run does.

    Vmapped with per-fold kernels, a plain convolution becomes one grouped convolution, which XLA's
    CPU runtime runs at a fraction of the speed (the 10 CK+ folds' step: 0.3-0.4x the speed of the
    folds one after another). `base` may be oneDNN's custom call (`perf.onednn_conv`),
    which has no batching rule of its own.
    """

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                             precision=None, preferred_element_type=None):
        def conv(x, w):
            return base(x, w, window_strides, padding, lhs_dilation=lhs_dilation,
                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                        precision=precision, preferred_element_type=preferred_element_type)

        @jax.custom_vjp
        def folded(x, w):
            return per_fold(conv)(x, w)

        def forward(x, w):
            return folded(x, w), (x, w)

        def backward(residuals, dy):
            return per_fold(lambda x, w, g: jax.vjp(conv, x, w)[1](g))(*residuals, dy)

        folded.defvjp(forward, backward)
        return folded(lhs, rhs)

    return conv_general_dilated


def fold_model(model_config: Any, num_classes: int, per_fold_convs: bool | None = None
               ) -> tuple[nn.Module, str]:
    """FERNet (`models.from_config`, `perf.building_blocks`) for vmapped folds, and how its
    convolutions run.

    `per_fold_convs` (None: on a CPU backend): each fold's convolutions through `fold_conv` on the
    path `conv_impl` resolves to (XLA or oneDNN), as its lone run computes them. Otherwise XLA's
    batching: one grouped convolution for all folds (what GPU libraries run well); oneDNN's custom
    call cannot be batched, so the convolutions then run on XLA (same mathematics).
    """
    if per_fold_convs is None:
        per_fold_convs = jax.default_backend() == "cpu"
    if per_fold_convs:
        dtype = perf.conv_dtype(model_config)
        impl = perf.resolve_conv_impl(model_config.conv_impl, dtype)
        conv, how = fold_conv(perf.conv_function(impl, dtype)), f"{impl}, per fold"
    else:  # oneDNN's custom_partitioning call has no batching (vmap) rule
        conv, how = lax.conv_general_dilated, "xla, grouped over folds"
    return models.from_config(model_config, num_classes, **perf.building_blocks(model_config, conv)), how


# ------------------------------------------------------------------------------------------------
# The vmapped steps


def _where(keep: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)


def fold_train_step(state: train.TrainState, batch: dict, rng: jax.Array, steps_per_epoch: jax.Array,
                    active: jax.Array, *, step: Callable, model: Any, loss_fn: Callable,
                    optimizer_config: Any, num_epochs: int, augment_config: Any,
                    label_smoothing: float = 0.0):
    """One fold's `step` (`train.train_step`) with its own schedule; an inactive fold (past its
    epoch's S_k steps) keeps its state and contributes nothing to the metrics."""
    tx = fold_optimizer(optimizer_config, steps_per_epoch, num_epochs)
    new_state, step_metrics = step(state, batch, rng, model=model, tx=tx, loss_fn=loss_fn,
                                   label_smoothing=label_smoothing,
                                   augment_config=augment_config)
    zeros = jax.tree.map(jnp.zeros_like, step_metrics)
    return _where(active, new_state, state), _where(active, step_metrics, zeros)


class FoldSteps(NamedTuple):
    """Compiled steps over a leading fold axis."""

    convolutions: str  # how the model's convolutions run (`fold_model`)
    sharding: jax.sharding.Sharding  # of every array the steps take and give: one device, replicated
    init: Callable  # one fold's init key -> its TrainState (`init_folds` stacks them)
    train: Callable  # (state, batch, train keys, steps_per_epoch [K], active [K]) -> (state, metrics)
    evaluate: Callable  # (state, batch) -> (EvalMetrics [K], confusion [K, C, C])


def fold_steps(config: ml_collections.ConfigDict, num_classes: int, *,
               step: Callable = train.train_step, eval_step: Callable = train.eval_step,
               per_fold_convs: bool | None = None) -> FoldSteps:
    """`train.create_train_state`, `step` and `eval_step` over folds, jitted (the state is donated
    to the train step), on `fold_model`."""
    model, convolutions = fold_model(config.model, num_classes, per_fold_convs)
    loss_fn = losses.get(config.loss)
    init_tx = fold_optimizer(config.optimizer, 1, config.num_epochs)  # the structure is all init uses
    # Initialisation is compiled for one fold, on the lone run's model, and run per key: compiling it
    # vmapped takes longer (threefry over every parameter) than running it K times. On one device it
    # is the very program of `train.Trainer.init_state`, so the two share one cached compilation.
    one_device = jax.make_mesh((1,), (train.DATA_AXIS,), devices=jax.devices()[:1],
                               axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(one_device, jax.sharding.PartitionSpec())
    init_one = jax.jit(functools.partial(train.create_train_state, tx=init_tx,
                                         model=models.from_config(
                                             config.model, num_classes,
                                             **perf.building_blocks(config.model))),
                       out_shardings=sharding)
    train_fn = functools.partial(
        fold_train_step, step=step, model=model, loss_fn=loss_fn, optimizer_config=config.optimizer,
        num_epochs=config.num_epochs, augment_config=config.augment,
        label_smoothing=config.label_smoothing)
    eval_fn = functools.partial(eval_step, model=model, loss_fn=loss_fn, num_classes=num_classes)
    return FoldSteps(convolutions=convolutions, sharding=sharding, init=init_one,
                     train=jax.jit(jax.vmap(train_fn), out_shardings=sharding, donate_argnums=(0,)),
                     evaluate=jax.jit(jax.vmap(eval_fn), out_shardings=sharding))


def stack_states(states: Sequence[Any]) -> Any:
    """Per-fold pytrees -> one pytree (on the host) with a leading fold axis."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *jax.device_get(list(states)))


def init_key(seed: int) -> jax.Array:
    """A fold's initialisation key, as `train.Trainer.init_state` derives it from config.seed."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def init_folds(steps: FoldSteps, seeds: Sequence[int]) -> train.TrainState:
    """Each fold's initial state (its lone run's), stacked along the fold axis."""
    return jax.device_put(stack_states([steps.init(init_key(s)) for s in seeds]), steps.sharding)


def abstract_folds(steps: FoldSteps, num_folds: int) -> train.TrainState:
    """Shapes, dtypes and sharding of the stacked state: the checkpoint restore target."""
    one = jax.eval_shape(steps.init, init_key(0))
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((num_folds, *x.shape), x.dtype, sharding=steps.sharding), one)


def train_keys(seeds: Sequence[int]) -> jax.Array:
    """Each fold's train-step key, as `train.Trainer.train` derives it from config.seed."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 2))(jnp.asarray(seeds))


# ------------------------------------------------------------------------------------------------
# Host side: stacked batches and per-fold reductions


def stack_batches(batches: Sequence[dict | None]) -> dict[str, np.ndarray]:
    """One batch [K, ...] from per-fold batches; None (an inactive fold) becomes zeros."""
    template = next(b for b in batches if b is not None)
    return {key: np.stack([np.zeros_like(value) if b is None else b[key] for b in batches])
            for key, value in template.items()}


def _mean(average: Any) -> np.ndarray:
    """Per-fold value [K] of a vmapped clu Average (nan where a fold counted nothing)."""
    total, count = np.asarray(average.total, np.float64), np.asarray(average.count, np.float64)
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


def _add(a: Any, b: Any) -> Any:
    return b if a is None else jax.tree.map(jnp.add, a, b)


def evaluate_folds(evaluate: Callable, state: train.TrainState, splits: Sequence[Any],
                   batch_size: int) -> list[dict]:
    """Loss, accuracy and [C, C] confusion matrix of each fold's state on its own split, every
    example once (`input_pipeline.eval_iterator`); folds with fewer batches get masked zeros."""
    iterators = [input_pipeline.eval_iterator(s, global_batch_size=batch_size) for s in splits]
    num_batches = [-(-len(s.images) // batch_size) for s in splits]
    total = confusion = None
    for i in range(max(num_batches)):
        batch = stack_batches([next(it) if i < n else None
                               for it, n in zip(iterators, num_batches, strict=True)])
        step_metrics, cm = evaluate(state, batch)
        total, confusion = _add(total, step_metrics), _add(confusion, cm)
    loss, accuracy = _mean(total.loss), _mean(total.accuracy)
    confusion = np.asarray(confusion).round().astype(int)
    return [{"loss": float(loss[k]), "accuracy": float(accuracy[k]), "confusion_matrix": confusion[k]}
            for k in range(len(splits))]


# ------------------------------------------------------------------------------------------------
# The study


def _fold_results(config, name, data, steps_per_epoch, total_steps, history, evaluation,
                  eval_name, params_count) -> dict:
    summary = report.confusion_metrics(evaluation["confusion_matrix"], data.class_names)
    summary.update(loss=evaluation["loss"], step=total_steps, epoch=total_steps / steps_per_epoch)
    return {
        "status": "completed",
        "repeat": name,
        "config": json.loads(config.to_json()),
        "dataset": {"name": data.name, "class_names": list(data.class_names),
                    "split_sizes": {k: int(len(v.images)) for k, v in data.splits.items()},
                    "source": data.source},
        "evaluated_split": eval_name,
        "evaluations": {"last": summary},  # the final epoch: no selection on the test fold
        "accuracy": summary["accuracy"],
        "best_validation_accuracy": max((h["validation_accuracy"] for h in history), default=None),
        "epochs": total_steps / steps_per_epoch,
        "steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "history": history,
        "parameters": params_count,
        "trained_with": "fermsca.crossval (folds vmapped together)",
    }


def summarize(fold_results: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Mean +- sample std of the folds' accuracies, and the pooled metrics of the confusion matrix
    summed over folds (per-class accuracy, macro F1)."""
    accuracy = np.array([r["accuracy"] for r in fold_results], np.float64)
    summed = np.sum([r["evaluations"]["last"]["confusion_matrix"] for r in fold_results], axis=0)
    return {
        "repeats": [r["repeat"] for r in fold_results],
        "evaluated_split": fold_results[0]["evaluated_split"],
        "accuracy_mean": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std(ddof=1)) if len(accuracy) > 1 else 0.0,
        "accuracy_per_fold": {r["repeat"]: r["accuracy"] for r in fold_results},
        "macro_f1_mean": float(np.mean([r["evaluations"]["last"]["macro_f1"] for r in fold_results])),
        "pooled": report.confusion_metrics(summed, class_names),
    }


def write_summary(directory: str, summary: dict, class_names: Sequence[str], dataset_name: str) -> None:
    """`summarize`'s record as `directory`/summary.json, and its pooled confusion matrix (the folds'
    summed, the paper's Fig. 8) as `directory`/confusion_matrix.png."""
    _write_json(os.path.join(directory, "summary.json"), summary)
    report.plot_confusion_matrix(
        np.asarray(summary["pooled"]["confusion_matrix"]), class_names,
        os.path.join(directory, "confusion_matrix.png"),
        title=f"{dataset_name} {summary['evaluated_split']}, {len(summary['repeats'])} folds summed "
              f"(acc {summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f})")


def _write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


RESUME = "the study resumes from its last saved epoch; rerun the same command"


def train_folds(config: ml_collections.ConfigDict, folds: Sequence[int], workdir: str, *,
                load: Callable = datasets.load, steps: FoldSteps | None = None) -> dict:
    """Trains repeats `folds` of `config` together (see the module docstring), evaluates each final
    state on its own test split (validation without one, or with `config.evaluate_test` off) and
    writes per-fold results and summary.json to `workdir`. Returns the summary.

    `load(dataset_config, required)` reads one fold's splits (`datasets.load`); `steps`: the
    compiled steps (`fold_steps`), built here when None.
    """
    start_time = time.time()
    folds = [int(k) for k in folds]
    if not folds or len(set(folds)) != len(folds):
        raise ValueError(f"folds {folds}: give one or more distinct folds")
    if jax.process_count() != 1:
        raise ValueError("crossval.train_folds runs in one process (the folds share its device)")
    config_schema.validate(config)
    if config.dataset.protocol == "all":
        raise cli.ConfigError("config.dataset.protocol='all' has no test folds to cross-validate; "
                              "use 'kfold' or 'random' (and 'all' with fermsca.main for a final model)")
    if config.dataset.train_subset:
        raise cli.ConfigError("config.dataset.train_subset is not supported by cross-validation")
    if config.class_weighting:
        raise cli.ConfigError("config.class_weighting is not supported by cross-validation")
    if config.ema_decay:
        raise cli.ConfigError("config.ema_decay is not supported by cross-validation (the folds' "
                              "states keep no weight average); set it to 0")
    if config.steps_per_dispatch != 1:
        log.warning("config.steps_per_dispatch=%d: cross-validation runs one vmapped step per "
                    "dispatch", config.steps_per_dispatch)
    configs = [fold_config(config, k) for k in folds]
    names = [repeat_name(config, k) for k in folds]
    data = [load(c.dataset, ("train", "validation", "test")) for c in configs]
    class_names = data[0].class_names
    batch = config.batch_size
    steps_per_epoch = [input_pipeline.steps_per_epoch(len(d.splits["train"].images), batch) for d in data]
    totals = [s * config.num_epochs for s in steps_per_epoch]
    if config.max_steps:
        totals = [min(t, config.max_steps) for t in totals]
    num_epochs = max(-(-t // s) for t, s in zip(totals, steps_per_epoch, strict=True))
    for name, d, s in zip(names, data, steps_per_epoch, strict=True):
        log.info("%s: %s; %d steps per epoch", name, datasets.describe(d).replace("\n", ";"), s)

    steps = steps or fold_steps(config, len(class_names))
    seeds = [c.seed for c in configs]
    rngs, spe = train_keys(seeds), jnp.asarray(steps_per_epoch, jnp.int32)
    abstract = abstract_folds(steps, len(folds))
    ckpts = checkpoint.RunCheckpoints(workdir, keep=config.keep_checkpoints,
                                      asynchronous=config.async_checkpoints)
    preemption = cli.Preemption("SIGTERM received: stopping; the study resumes from its last saved "
                                "epoch")
    try:
        with preemption:
            restored = ckpts.restore_latest(abstract)
            # The wall time of the processes before this one, known from epoch `counted_from` on
            # (a checkpoint written before it was recorded knows none).
            earlier_seconds, counted_from = 0.0, 0
            if restored is None:
                state, start_epoch, history = init_folds(steps, seeds), 0, {n: [] for n in names}
            else:
                state, meta = restored
                if meta.get("repeats") != names:
                    raise cli.ConfigError(f"{workdir} holds a study of {meta.get('repeats')}, not {names}: "
                                          "rerun with the same folds or use another --workdir")
                start_epoch, history = int(meta["epoch"]), meta["history"]
                earlier_seconds = float(meta.get("wall_time_seconds", 0.0))
                counted_from = int(meta.get("wall_time_counted_from_epoch",
                                            0 if "wall_time_seconds" in meta else start_epoch))
                log.info("resumed from epoch %d", start_epoch)
            fold_steps_done = [min(start_epoch * s, t) for s, t in zip(steps_per_epoch, totals, strict=True)]
            if list(np.asarray(state.step)) != fold_steps_done:
                raise checkpoint.CheckpointError(f"{workdir}: checkpoint steps {np.asarray(state.step)} "
                                                 f"are not epoch {start_epoch}'s {fold_steps_done}")
            iterators = [input_pipeline.train_iterator(d.splits["train"], global_batch_size=batch,
                                                       seed=c.seed, start_step=done)
                         for d, c, done in zip(data, configs, fold_steps_done, strict=True)]
            meta_base = {"config": config.to_json(), "class_names": list(class_names), "repeats": names}
            images = seconds = 0.0
            for epoch in range(start_epoch, num_epochs):
                epoch_metrics, started = None, None
                for i in range(max(steps_per_epoch)):
                    active = np.array([i < s and epoch * s + i < t
                                       for s, t in zip(steps_per_epoch, totals, strict=True)])
                    if not active.any():
                        break
                    if i == 1:  # after the first step of the epoch (compilation, evaluation)
                        jax.block_until_ready(state)
                        started = time.perf_counter()
                    stacked = stack_batches([next(it) if a else None
                                             for it, a in zip(iterators, active, strict=True)])
                    state, step_metrics = steps.train(state, stacked, rngs, spe, active)
                    if preemption.requested:
                        raise cli.Preempted(f"pre-empted (SIGTERM) in epoch {epoch + 1}: " + RESUME)
                    epoch_metrics = _add(epoch_metrics, step_metrics)
                    if started is not None:
                        images += batch * int(active.sum())
                jax.block_until_ready(state)
                seconds += time.perf_counter() - started if started is not None else 0.0
                _epoch_end(epoch, state, epoch_metrics, steps, data, config, names, steps_per_epoch, totals,
                           history)
                if (epoch + 1) % config.checkpoint_every_epochs == 0 or epoch + 1 == num_epochs:
                    ckpts.save(epoch + 1, state, {
                        **meta_base, "epoch": epoch + 1, "history": history,
                        "wall_time_seconds": earlier_seconds + time.time() - start_time,
                        "wall_time_counted_from_epoch": counted_from})
                if preemption.requested and epoch + 1 < num_epochs:
                    raise cli.Preempted(f"pre-empted (SIGTERM) after epoch {epoch + 1}: " + RESUME)
            ckpts.wait()
    finally:
        ckpts.close()

    use_test = config.evaluate_test and all("test" in d.splits for d in data)
    eval_name = "test" if use_test else "validation"
    evaluations = evaluate_folds(steps.evaluate, state, [d.splits[eval_name] for d in data],
                                 config.eval_batch_size)
    params_count = models.count_params(abstract_folds(steps, 1).params)
    fold_results = []
    for k, name in enumerate(names):
        result = _fold_results(configs[k], name, data[k], steps_per_epoch[k], totals[k], history[name],
                               evaluations[k], eval_name, params_count)
        _write_json(os.path.join(workdir, name, "results.json"), result)
        fold_results.append(result)
    summary = summarize(fold_results, class_names)
    summary.update({
        "config": json.loads(config.to_json()),
        "class_names": list(class_names),
        "steps_per_epoch": dict(zip(names, steps_per_epoch, strict=True)),
        "convolutions": steps.convolutions,
        # every process's time up to its last checkpoint, from epoch `counted_from` on
        "wall_time_seconds": earlier_seconds + time.time() - start_time,
        "wall_time_counted_from_epoch": counted_from,
        "train_images_per_second": images / seconds if seconds else None,
        "device_kind": jax.devices()[0].device_kind,
    })
    write_summary(workdir, summary, class_names, data[0].name)
    log.info("%s accuracy %.4f ± %.4f over %d folds -> %s", eval_name, summary["accuracy_mean"],
             summary["accuracy_std"], len(folds), os.path.join(workdir, "summary.json"))
    return summary


def _epoch_end(epoch, state, epoch_metrics, steps, data, config, names, steps_per_epoch, totals,
               history) -> None:
    """Checks the epoch's losses, validates every fold and appends each trained fold's history row."""
    loss, accuracy = _mean(epoch_metrics.loss), _mean(epoch_metrics.accuracy)
    nonfinite = np.asarray(epoch_metrics.nonfinite.total)
    for k, name in enumerate(names):
        trained = epoch * steps_per_epoch[k] < totals[k]
        if nonfinite[k] > 0 or (trained and not np.isfinite(loss[k])):
            raise train.NonFiniteLossError(
                f"{name}: non-finite loss or gradient in epoch {epoch + 1}; the study is stopped. "
                "Lower config.optimizer.learning_rate / values, or check the data.")
    val = evaluate_folds(steps.evaluate, state, [d.splits["validation"] for d in data],
                         config.eval_batch_size)
    for k, name in enumerate(names):
        if epoch * steps_per_epoch[k] >= totals[k]:
            continue  # finished (max_steps) before this epoch
        done = min((epoch + 1) * steps_per_epoch[k], totals[k])
        lr = fold_schedule(config.optimizer, steps_per_epoch[k], config.num_epochs)(done - 1)
        history[name].append({
            "epoch": round(done / steps_per_epoch[k], 4), "train_loss": float(loss[k]),
            "train_accuracy": float(accuracy[k]), "validation_loss": val[k]["loss"],
            "validation_accuracy": val[k]["accuracy"], "learning_rate": float(lr)})
    log.info("epoch %d: train accuracy %s | validation accuracy %s", epoch + 1,
             " ".join(f"{a:.3f}" for a in accuracy), " ".join(f"{v['accuracy']:.3f}" for v in val))
