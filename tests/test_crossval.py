"""Cross-validation folds trained as one vmapped computation (fermsca.crossval): each fold ends where
its lone run (`train.Trainer.train`, step by step) ends, folds of different sizes and per-fold Table 1
schedules included; results files; resumption from the last epoch's checkpoint.

The study is a tiny FERNet (one residual block, width 8) on a CK+48 copy of 54 noise images written
by tests/fixtures.py: 8 subjects, 4 subject-independent folds, of which folds 0-2 train on 24, 27
and 30 images, i.e. 3, 3 and 4 steps per epoch at the paper's batch of 7.
"""

import functools
import json
import os
import re
import shutil

import fixtures
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from configs import default
from fermsca import checkpoint, cli, crossval, datasets, input_pipeline, schedules, train
from fermsca.datasets import ckplus
from fermsca.perf import onednn_conv

FOLDS = (0, 1, 2)
EPOCHS = 2
SEQUENCES_PER_SUBJECT = (4, 3, 3, 2, 2, 2, 1, 1)  # 3 frames each: folds of unequal size


@pytest.fixture(scope="module")
def ckplus48_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckplus48")
    rng = np.random.default_rng(0)
    entries = []
    for subject, sequences in enumerate(SEQUENCES_PER_SUBJECT):
        for sequence in range(1, sequences + 1):
            label = ckplus.CLASS_NAMES[(subject + sequence) % len(ckplus.CLASS_NAMES)]
            for frame in range(8, 11):
                name = f"S{subject + 10:03d}_{sequence:03d}_{frame:08d}.png"
                entries.append((label, name, fixtures.noise_image(rng)))
    fixtures.write_ckplus48(root, entries)
    return str(root)


def tiny_config(manual_dir: str, data_dir: str) -> ml_collections.ConfigDict:
    """configs/ckplus.py's training (batch 7, Adam, cosine loss, paper augmentation) on a tiny FERNet,
    with a learning-rate drop at epoch 1, which comes after 3 steps in two folds and 4 in the third.

    The rates are Table 1's last two, 1e-5 then 1e-6 (see `test_folds_match_lone_runs`)."""
    c = default.get_config()
    c.dataset.name = "ckplus"
    c.dataset.builder_config = "ckplus48"
    c.dataset.manual_dir = manual_dir
    c.dataset.data_dir = data_dir
    c.dataset.num_folds = 4
    c.model.stem_width = 8
    c.model.widths = (8,)
    c.model.use_se = False  # a third less compilation; what is vmapped does not depend on the blocks
    c.model.conv_impl = "xla"  # the path every variant of the vmapped step can take, as the lone runs
    c.optimizer.boundary_epochs = (1,)
    c.optimizer.values = (1e-5, 1e-6)
    c.num_epochs = EPOCHS
    c.batch_size = 7
    c.eval_batch_size = 7
    c.async_checkpoints = False
    return c


@pytest.fixture(scope="module")
def study(ckplus48_dir, tmp_path_factory):
    """One study of folds 0-2, run once: (config, workdir, summary, compiled steps)."""
    config = tiny_config(ckplus48_dir, str(tmp_path_factory.mktemp("tfds")))
    workdir = str(tmp_path_factory.mktemp("study"))
    steps = crossval.fold_steps(config, len(ckplus.CLASS_NAMES))
    summary = crossval.train_folds(config, FOLDS, workdir, steps=steps)
    return config, workdir, summary, steps


def final_variables(workdir: str) -> dict:
    variables, _ = checkpoint.load_checkpoint(os.path.join(workdir, checkpoint.LATEST_DIR))
    return variables


def lone_run(config: ml_collections.ConfigDict, fold: int, trainers: dict):
    """Fold `fold` trained alone by the single-run path: (steps per epoch, final TrainState).

    `trainers`: the `train.Trainer` of each steps-per-epoch value so far (it reads no dataset field,
    so folds of one size share its compiled step)."""
    fold_config = crossval.fold_config(config, fold)
    data = datasets.load(fold_config.dataset)
    split = data.splits["train"]
    steps_per_epoch = input_pipeline.steps_per_epoch(len(split.images), fold_config.batch_size)
    if steps_per_epoch not in trainers:
        trainers[steps_per_epoch] = train.Trainer(fold_config, data.num_classes, steps_per_epoch,
                                                  train.make_mesh())
    trainer = trainers[steps_per_epoch]
    state = trainer.init_state()
    batches = input_pipeline.train_iterator(split, global_batch_size=fold_config.batch_size,
                                            seed=fold_config.seed)
    for _ in range(steps_per_epoch * fold_config.num_epochs):
        state, _ = trainer.train(state, next(batches))
    return steps_per_epoch, jax.device_get(state)


def test_fold_schedule_is_the_lone_runs_schedule():
    optimizer = default.get_config().optimizer
    counts = jnp.arange(0, 1200)
    for steps_per_epoch in (1, 3, 4, 7):
        lone = schedules.create_schedule(optimizer, steps_per_epoch, num_epochs=30)
        fold = crossval.fold_schedule(optimizer, jnp.int32(steps_per_epoch), num_epochs=30)
        np.testing.assert_array_equal(fold(counts), jax.vmap(lone)(counts))
    # Vmapped over folds with per-fold steps per epoch, as the train step uses it.
    spe = jnp.array([3, 4, 7])
    rates = jax.vmap(lambda s: crossval.fold_schedule(optimizer, s, 30)(jnp.int32(36)))(spe)
    np.testing.assert_array_equal(rates, np.float32([1e-4, 1e-3, 1e-3]))  # epoch 12 | 9 | 5; boundary at 12


def _conv_loss(conv, x, w, g):
    return jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) * g)


def _fold_operands(folds=3):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(folds, 2, 9, 9, 4)).astype(np.float32),
            rng.normal(size=(folds, 3, 3, 4, 5)).astype(np.float32),
            rng.normal(size=(folds, 2, 9, 9, 5)).astype(np.float32))


def test_fold_conv_runs_each_folds_convolution():
    """Vmapped over per-fold kernels, `fold_conv` computes each fold's convolution and gradients as
    one unbatched convolution each, where XLA's batching makes one grouped convolution of them."""
    x, w, g = _fold_operands()
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    folded = jax.jit(jax.vmap(grad(functools.partial(_conv_loss, crossval.fold_conv()))))
    got = folded(x, w, g)
    for k in range(len(x)):
        want = grad(functools.partial(_conv_loss, lax.conv_general_dilated))(x[k], w[k], g[k])
        jax.tree.map(lambda a, b, k=k: np.testing.assert_allclose(a[k], b, rtol=1e-6, atol=1e-5),
                     got, want)
    plain = jax.jit(jax.vmap(grad(functools.partial(_conv_loss, lax.conv_general_dilated))))
    assert "feature_group_count = 3" in plain.lower(x, w, g).as_text()
    assert "feature_group_count = 3" not in folded.lower(x, w, g).as_text()


@pytest.mark.skipif(not onednn_conv.available(), reason="oneDNN extension unavailable")
def test_fold_conv_vmaps_onednn():
    """oneDNN's custom call has no batching rule; through `fold_conv` it runs per fold."""
    x, w, g = _fold_operands(2)
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    with pytest.raises(NotImplementedError):
        jax.vmap(grad(functools.partial(_conv_loss, onednn_conv.conv_general_dilated)))(x, w, g)
    conv = crossval.fold_conv(onednn_conv.conv_general_dilated)
    got = jax.jit(jax.vmap(grad(functools.partial(_conv_loss, conv))))(x, w, g)
    for k in range(len(x)):
        want = grad(functools.partial(_conv_loss, lax.conv_general_dilated))(x[k], w[k], g[k])
        jax.tree.map(lambda a, b, k=k: np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-4),
                     got, want)


@pytest.mark.skipif(not onednn_conv.available() or onednn_conv.bfloat16_reason() is not None,
                    reason="no oneDNN bfloat16 convolution on this CPU")
def test_fold_conv_vmaps_bfloat16_operands_on_onednn():
    """config.model.conv_dtype=bfloat16 over folds: each fold gets its lone run's bfloat16 convolution."""
    from fermsca import perf

    x, w, g = _fold_operands(2)
    grad = functools.partial(jax.value_and_grad, argnums=(0, 1))
    conv = perf.BFloat16Operands(crossval.fold_conv(onednn_conv.conv_general_dilated))
    got = jax.jit(jax.vmap(grad(functools.partial(_conv_loss, conv))))(x, w, g)
    lone = perf.BFloat16Operands(onednn_conv.conv_general_dilated)
    for k in range(len(x)):
        want = jax.jit(grad(functools.partial(_conv_loss, lone)))(x[k], w[k], g[k])
        jax.tree.map(lambda a, b, k=k: np.testing.assert_allclose(a[k], b, rtol=1e-6, atol=1e-5),
                     got, want)
    assert got[1][0].dtype == jnp.float32


@pytest.mark.slow  # trains three tiny folds twice (about 30 s)
def test_folds_match_lone_runs(study):
    """Each fold's final parameters and BatchNorm statistics are its lone run's, to float32 rounding.

    vmap reorders reductions (and without per-fold convolutions makes grouped ones). At Table 1's
    first rate, 1e-3, Adam and this tiny network on noise images magnify that rounding: parameters
    end up to 9e-6 apart after 8 steps (3e-4 with SE on, as far with one fold vmapped alone, so not
    the fold logic). At 1e-5 then 1e-6 they agree to 5e-8 (BatchNorm statistics to 3e-7), and one
    wrong step still shows: Adam moves every parameter by about the rate per step, a wrong batch
    changes the BatchNorm statistics outright, and a step at the other epoch's rate is 9e-6 off."""
    config, workdir, summary, steps = study
    stacked = final_variables(workdir)
    sizes, trainers = [], {}
    for k, fold in enumerate(FOLDS):
        steps_per_epoch, state = lone_run(config, fold, trainers)
        sizes.append(steps_per_epoch)
        assert summary["steps_per_epoch"][f"fold_{fold}"] == steps_per_epoch
        for part in ("params", "batch_stats"):
            lone = jax.tree_util.tree_leaves_with_path(getattr(state, part))
            vmapped = jax.tree.leaves(jax.tree.map(lambda x, k=k: x[k], stacked[part]))
            assert len(lone) == len(vmapped)
            for (path, want), got in zip(lone, vmapped, strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                           err_msg=f"fold {fold} {part}{jax.tree_util.keystr(path)}")
    assert len(set(sizes)) > 1, f"the folds should differ in steps per epoch, got {sizes}"


@pytest.mark.slow  # trains three tiny folds twice (about 30 s)
def test_results_files(study):
    config, workdir, summary, steps = study
    names = [f"fold_{k}" for k in FOLDS]
    assert summary["repeats"] == names and summary["evaluated_split"] == "test"
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["repeats"] == names
    assert os.path.isfile(os.path.join(workdir, "confusion_matrix.png"))
    total = np.zeros((len(ckplus.CLASS_NAMES),) * 2, int)
    accuracies = []
    for k, name in zip(FOLDS, names, strict=True):
        with open(os.path.join(workdir, name, "results.json")) as f:
            result = json.load(f)
        test = datasets.load(crossval.fold_config(config, k).dataset).splits["test"]
        cm = np.asarray(result["evaluations"]["last"]["confusion_matrix"])
        assert cm.sum() == len(test.images) == result["dataset"]["split_sizes"]["test"]
        np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(test.targets.argmax(-1),
                                                                  minlength=len(total)))
        assert result["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        assert [h["epoch"] for h in result["history"]] == [1, 2]
        assert [h["learning_rate"] for h in result["history"]] == pytest.approx([1e-5, 1e-6])
        assert result["steps"] == EPOCHS * result["steps_per_epoch"]
        total += cm
        accuracies.append(result["accuracy"])
    assert summary["accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert summary["accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    np.testing.assert_array_equal(summary["pooled"]["confusion_matrix"], total)
    assert set(summary["pooled"]["per_class_accuracy"]) == set(ckplus.CLASS_NAMES)


@pytest.mark.slow  # trains three tiny folds twice (about 30 s)
def test_resumes_from_the_last_epoch(study, tmp_path):
    """A study killed after its epoch-1 checkpoint ends where the uninterrupted one ended."""
    config, workdir, summary, steps = study
    killed = str(tmp_path / "killed")
    shutil.copytree(workdir, killed)
    shutil.rmtree(os.path.join(killed, checkpoint.LATEST_DIR, str(EPOCHS)))
    for name in ("summary.json", *[os.path.join(f"fold_{k}", "results.json") for k in FOLDS]):
        os.remove(os.path.join(killed, name))
    _, meta = checkpoint.load_checkpoint(os.path.join(killed, checkpoint.LATEST_DIR, "1"))
    resumed = crossval.train_folds(config, FOLDS, killed, steps=steps)
    # the wall time counts the first process's up to its epoch-1 checkpoint, then this one's
    assert resumed["wall_time_seconds"] > meta["wall_time_seconds"] > 0
    assert resumed["wall_time_counted_from_epoch"] == meta["wall_time_counted_from_epoch"] == 0
    want, got = final_variables(workdir), final_variables(killed)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), want, got)
    assert resumed["accuracy_per_fold"] == summary["accuracy_per_fold"]
    with pytest.raises(ValueError, match="holds a study of"):
        crossval.train_folds(config, (0, 1, 3), killed, steps=steps)


@pytest.mark.slow  # two tiny studies in subprocesses (about 60 s)
def test_sigterm_stops_the_study_with_status_75_and_the_rerun_resumes(ckplus48_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    workdir = tmp_path / "study"
    cmd = [sys.executable, "-m", "experiments.paper.ckplus_cv", "--config", "configs/ckplus.py",
           f"--workdir={workdir}", "--folds=0,1", f"--config.dataset.manual_dir={ckplus48_dir}",
           f"--config.dataset.data_dir={tmp_path / 'tfds'}", "--config.dataset.num_folds=4",
           "--config.model.stem_width=8", "--config.model.widths=(8,)", "--config.model.use_se=False",
           "--config.model.conv_impl=xla", "--config.num_epochs=40", "--config.async_checkpoints=False",
           "--compilation_cache=off"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = workdir / checkpoint.LATEST_DIR / "1" / "_CHECKPOINT_METADATA"
    deadline = time.monotonic() + 600
    while not first.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no epoch-1 checkpoint"
        time.sleep(0.1)
    saved = max(int(d.name) for d in (workdir / checkpoint.LATEST_DIR).iterdir() if d.name.isdigit())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_PREEMPTED, err[-3000:]
    assert err.splitlines()[-1].endswith(": " + crossval.RESUME), err[-3000:]
    assert err.splitlines()[-1].startswith("pre-empted (SIGTERM) ")
    # It stops in the epoch it was in, or after it: not at the end of 40 (a bound in steps, not in
    # seconds, which a loaded machine stretches; the 120 s above catches a hang).
    stopped = int(re.search(r"epoch (\d+):", err.splitlines()[-1]).group(1))
    assert saved <= stopped <= saved + 2, (saved, stopped)
    assert not (workdir / "summary.json").exists()
    rerun = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from epoch" in rerun.stderr
    assert len(json.loads((workdir / "summary.json").read_text())["accuracy_per_fold"]) == 2


def test_fold_config_names_the_field():
    config = default.get_config()
    config.dataset.num_folds = 4
    assert crossval.fold_config(config, 3).dataset.fold == 3
    with pytest.raises(ValueError, match="config.dataset.fold"):
        crossval.fold_config(config, 4)
    config.dataset.protocol = "random"  # image-level k-fold: the same folds, the same names
    assert crossval.fold_config(config, 2).dataset.fold == 2
    assert crossval.fold_config(config, 2).dataset.split_seed == config.dataset.split_seed
    assert crossval.repeat_name(config, 2) == "fold_2"
    with pytest.raises(ValueError, match="config.dataset.fold"):
        crossval.fold_config(config, 4)


def test_schedules_that_change_within_an_epoch_are_refused():
    """Folds read the schedule once per epoch, which is the lone run's only for per-epoch schedules."""
    optimizer = default.get_config().optimizer
    optimizer.schedule = "warmup_cosine"
    with pytest.raises(cli.ConfigError, match=r"schedule='warmup_cosine': cross-validation takes"):
        crossval.fold_schedule(optimizer, 10, 20)
