"""The training driver end to end: CLI run, multi-device and multi-process agreement, resume after
kill -9, SIGTERM, corrupt checkpoints, NaN stop, config mismatch.

Runs use a tiny network on a 256-image subset of the built-in synthetic set, in subprocesses (the CLI
as a user runs it, and XLA_FLAGS must be set before JAX starts).
"""

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import types

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from fermsca import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.stem_width=8",
    "--config.model.widths=(8,)",  # one residual block: the driver is under test, not depth
    "--config.dataset.train_subset=256",
    "--config.batch_size=32",
    "--config.eval_batch_size=200",
    "--config.num_epochs=3",
    "--config.log_every_steps=4",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The synthetic set built once into a private TFDS data dir."""
    from configs import default
    from fermsca import datasets

    path = str(tmp_path_factory.mktemp("tfds"))
    cfg = default.get_config().dataset
    cfg.data_dir = path
    datasets.load(cfg, required=("train", "validation", "test"))
    return path


def _env(devices: int = 1, fast_compile: bool = True) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if fast_compile:  # LLVM's lowest optimisation level: the tiny steps compile in half the time
        env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _main_cmd(workdir, data_dir, *overrides) -> list[str]:
    # A repeated --config.<field> would extend a tuple field rather than replace it: merge by name.
    flags = {}
    for flag in (*TINY, *overrides):
        flags[flag.split("=")[0]] = flag
    return [sys.executable, "-m", "fermsca.main", "--config", "configs/default.py",
            f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}", *flags.values()]


def run_main(workdir, data_dir, *overrides, devices=1, check=True, timeout=600):
    proc = subprocess.run(_main_cmd(workdir, data_dir, *overrides), cwd=REPO, env=_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def final_params(workdir) -> dict[str, np.ndarray]:
    variables, _ = checkpoint.load_checkpoint(os.path.join(workdir, checkpoint.LATEST_DIR))
    import jax

    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def assert_same_params(a, b, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def committed_steps(workdir) -> list[int]:
    d = os.path.join(workdir, checkpoint.LATEST_DIR)
    if not os.path.isdir(d):
        return []
    return sorted(int(s) for s in os.listdir(d)
                  if s.isdigit() and os.path.exists(os.path.join(d, s, "_CHECKPOINT_METADATA")))


def wait_for(predicate, proc, timeout=900):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture(scope="session")
def reference_run(data_dir, tmp_path_factory):
    """One uninterrupted tiny run, 3 epochs of 8 steps, made once per test run: (workdir, the
    process's stdout and stderr)."""
    from conftest import built_once

    with built_once(tmp_path_factory, "reference_run") as (path, build):
        if build:
            proc = run_main(str(path / "workdir"), data_dir)
            (path / "stdout").write_text(proc.stdout)
            (path / "stderr").write_text(proc.stderr)
    output = types.SimpleNamespace(stdout=(path / "stdout").read_text(), stderr=(path / "stderr").read_text())
    return str(path / "workdir"), output


def test_cli_run_writes_results_checkpoints_and_events(reference_run):
    workdir, proc = reference_run
    assert "accuracy" in proc.stdout and "results.json" in proc.stdout
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["status"] == "completed"
    assert results["steps"] == 24 and results["epochs"] == 3
    assert results["dataset"]["split_sizes"]["train"] == 256
    assert results["evaluated_split"] == "test"
    best = results["evaluations"]["best"]
    assert best["num_examples"] == results["dataset"]["split_sizes"]["test"]
    cm = np.array(best["confusion_matrix"])
    assert cm.shape == (8, 8) and cm.sum() == best["num_examples"]
    assert abs(np.trace(cm) / cm.sum() - best["accuracy"]) < 1e-9
    assert len(results["history"]) == 3
    for key in ("versions", "device_kind", "device_count", "git_commit", "seed", "wall_time_seconds",
                "train_images_per_second", "parameters"):
        assert key in results
    assert results["train_images_per_second"] > 0
    assert results["train_data_on_device"] is False  # data_on_device "auto" is off on a CPU
    assert results["dataset"]["source"] is None  # built-in set: no raw files to fingerprint
    assert results["warnings"] == [] or all("not learning" in w for w in results["warnings"])
    with open(os.path.join(workdir, "progress.json")) as f:  # the per-epoch record, final form
        progress = json.load(f)
    assert progress["status"] == "completed" and progress["step"] == 24
    assert progress["epoch"] == progress["num_epochs"] == 3
    assert progress["history"] == results["history"]
    assert progress["best_validation_accuracy"] == results["best_validation_accuracy"]
    assert progress["config"] == results["config"] and progress["seed"] == results["seed"]
    assert progress["seconds_per_epoch"] > 0 and progress["estimated_seconds_left"] == 0
    # The run's compiled steps went to the persistent cache (tests/conftest.py points it here).
    cache = os.listdir(os.environ["FERMSCA_COMPILATION_CACHE"])
    assert any(name.startswith("jit_train_step-") for name in cache), cache
    assert committed_steps(workdir) == [16, 24]  # keep_checkpoints=2
    # Each checkpoint records the run's wall time so far, so that a resumed run's total counts it.
    _, meta = checkpoint.load_checkpoint(os.path.join(workdir, checkpoint.LATEST_DIR, "24"))
    assert 0 < meta["wall_time_seconds"] <= results["wall_time_seconds"]
    assert meta["wall_time_counted_from_step"] == 0 and results["resumed_from_step"] is None
    assert os.listdir(os.path.join(workdir, checkpoint.BEST_DIR))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    for png in ("confusion_matrix_best.png", "confusion_matrix_last.png", "training_curves.png"):
        with open(os.path.join(workdir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eight_simulated_devices_match_one(tmp_path):
    """Same global batch over 1 and 8 devices: same parameters after 3 steps (BN over the global batch),
    one step per dispatch or the 3 in one (`steps_per_dispatch`), and the 3 in one gathered from the
    split on the devices (whole on each; the indices sharded as the batch is)."""
    out = {}
    for devices, per_dispatch, on_device in ((1, 1, 0), (8, 1, 0), (8, 3, 0), (8, 3, 1)):
        path = tmp_path / f"params{devices}_{per_dispatch}_{on_device}.npz"
        subprocess.run([sys.executable, "tests/_train_steps.py", str(path), "3", str(per_dispatch),
                        str(on_device)],
                       cwd=REPO, env=_env(devices, fast_compile=False), check=True, capture_output=True,
                       timeout=900)
        data = dict(np.load(path))
        assert int(data.pop("__devices")) == devices
        out[devices, per_dispatch, on_device] = data
    assert_same_params(out[1, 1, 0], out[8, 1, 0], rtol=2e-4, atol=2e-6)
    assert_same_params(out[8, 1, 0], out[8, 3, 0], rtol=1e-6, atol=1e-7)  # the 3 steps as one scan
    assert_same_params(out[8, 3, 0], out[8, 3, 1], rtol=1e-6, atol=1e-7)  # gathered on the devices


def test_batch_not_divisible_by_devices_is_refused(tmp_path, data_dir):
    proc = run_main(tmp_path, data_dir, "--config.batch_size=30", devices=4, check=False)
    assert proc.returncode != 0
    assert "config.batch_size=30 must be divisible by the number of devices (4)" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("data_on_device", ["off", "on"])
def test_two_processes_train_and_agree(tmp_path, data_dir, reference_run, data_on_device):
    """jax.distributed on localhost: 2 processes x 1 device, each feeding half of every batch (or
    half of its indices, into the split each process placed whole on its device)."""
    workdir = str(tmp_path / "two")
    port = _free_port()
    procs = [subprocess.Popen(
        _main_cmd(workdir, data_dir, f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}", f"--config.data_on_device={data_on_device}"),
        cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["process_count"] == 2 and results["device_count"] == 2
    assert results["train_data_on_device"] is (data_on_device == "on")
    assert_same_params(final_params(reference_run[0]), final_params(workdir), rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_kill9_and_resume_matches_uninterrupted(tmp_path, data_dir, reference_run):
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(_main_cmd(workdir, data_dir), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: committed_steps(workdir), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "results.json")), "finished before the kill"
    assert max(committed_steps(workdir)) < 24
    resumed = run_main(workdir, data_dir)
    assert "resumed from step" in resumed.stderr
    assert_same_params(final_params(reference_run[0]), final_params(workdir))


@pytest.mark.slow  # two CLI runs (about 30 s); tests/test_cli.py maps Preempted to status 75 in the suite
def test_sigterm_saves_and_resumes(tmp_path, data_dir, reference_run):
    workdir = str(tmp_path / "preempted")
    proc = subprocess.Popen(_main_cmd(workdir, data_dir, "--config.num_epochs=3"), cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: committed_steps(workdir), proc)
    saved = max(committed_steps(workdir))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]  # fermsca.cli.EXIT_PREEMPTED
    assert "pre-empted at step" in err
    step = int(err.split("pre-empted at step")[1].split(":")[0])
    assert step in committed_steps(workdir)
    with open(os.path.join(workdir, "progress.json")) as f:  # how far it got, beside the checkpoints
        progress = json.load(f)
    assert progress["status"] == "preempted" and progress["step"] == step
    assert len(progress["history"]) == int(progress["epoch"]) and progress["num_epochs"] == 3
    # Honoured at the next step, not at the end of the run (8 steps an epoch, 24 in all): a bound in
    # steps, since a loaded machine stretches seconds; the time-out above catches a hang.
    assert saved <= step <= saved + 8 and step < 24, (saved, step)
    _, meta = checkpoint.load_checkpoint(os.path.join(workdir, checkpoint.LATEST_DIR, str(step)))
    run_main(workdir, data_dir)
    assert_same_params(final_params(reference_run[0]), final_params(workdir))
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    # The wall time adds the pre-empted process's, up to its checkpoint, to the resumed one's.
    assert results["resumed_from_step"] == step and meta["wall_time_counted_from_step"] == 0
    assert results["wall_time_seconds"] > meta["wall_time_seconds"] > 0
    assert not any("wall_time_seconds counts only" in w for w in results["warnings"])


def test_corrupt_latest_checkpoint_falls_back(tmp_path, data_dir, reference_run, caplog):
    import shutil

    workdir = str(tmp_path / "corrupt")
    shutil.copytree(reference_run[0], workdir)
    latest = os.path.join(workdir, checkpoint.LATEST_DIR, "24", "state")
    for root, _, files in os.walk(latest):
        for name in files:
            if name not in ("_CHECKPOINT_METADATA",):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\x00garbage")
    proc = run_main(workdir, data_dir)
    assert "checkpoints/24 is corrupt or partial" in proc.stderr
    assert "trying an older one" in proc.stderr
    assert "resumed from step 16" in proc.stderr
    assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "24"))
    assert_same_params(final_params(reference_run[0]), final_params(workdir))


def test_checkpoint_from_another_config_is_refused(tmp_path, data_dir):
    """A run's checkpoint of the TINY model (widths (8,)), resumed with widths (16,). The checkpoint
    is written here, not trained, so this test does not wait for the shared reference run."""
    import tiny_run

    from configs import default
    from fermsca import inference

    config = default.get_config()
    config.model.stem_width, config.model.widths = 8, (8,)
    variables = tiny_run.random_variables(inference.build_model(config.model, len(tiny_run.CLASS_NAMES)),
                                          seed=0)
    workdir = tiny_run.save_run_checkpoint(str(tmp_path / "mismatch"), config, variables, step=8)
    proc = run_main(workdir, data_dir, "--config.model.widths=(16,)", check=False)
    assert proc.returncode != 0
    assert "does not match the config" in proc.stderr
    assert "params/block1/conv/kernel: checkpoint has (3, 3, 8, 8), config expects (3, 3, 16, 16)" \
        in proc.stderr


@pytest.mark.slow  # a CLI run; the step's guard and the loop's stop are tested in this process below
def test_nan_loss_stops_the_run(tmp_path, data_dir):
    workdir = str(tmp_path / "nan")
    proc = run_main(workdir, data_dir, "--config.optimizer.schedule=constant",
                    "--config.optimizer.learning_rate=1e30", "--config.checkpoint_every_steps=1",
                    check=False)
    assert proc.returncode != 0
    assert "non-finite loss or gradient" in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    steps = committed_steps(workdir)
    if steps:  # every checkpoint left behind holds finite parameters
        for v in final_params(workdir).values():
            assert np.all(np.isfinite(v))


class _Linear(nn.Module):
    """A model as small as the train step allows (logits from pixels, BatchNorm statistics), so that
    the step's own logic is tested without compiling FERNet."""

    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train)(x.reshape(x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


def _step_setup(**augment_fields):
    """(jitted train_step with keyword arguments bound, state, batch): no affine augmentation, so a
    step's images are the preprocessed batch."""
    from configs import default
    from fermsca import losses, train

    config = default.get_config()
    config.augment.update(shift=0.0, rotation=0.0, zoom=0.0, **augment_fields)
    model, tx = _Linear(), optax.sgd(0.1)
    state = train.create_train_state(jax.random.key(0), model, tx)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (6, 48, 48, 1), dtype=np.uint8),
             "target": np.eye(4, dtype=np.float32)[rng.integers(0, 4, 6)]}

    def step(batch, **kwargs):
        fn = functools.partial(train.train_step, model=model, tx=tx, loss_fn=losses.get("cosine"),
                               augment_config=config.augment, **kwargs)
        return jax.jit(fn)(state, batch, jax.random.key(1))

    return step, model, state, batch


def test_label_smoothing_trains_on_smoothed_targets():
    """train_step with label_smoothing a is train_step on (1 - a) * y + a / K, metrics on y."""
    step, _, _, batch = _step_setup()
    smoothed, m1 = step(batch, label_smoothing=0.2)
    by_hand, m2 = step({**batch, "target": 0.8 * batch["target"] + 0.05})
    plain, _ = step(batch)
    for a, b in zip(jax.tree.leaves(smoothed.params), jax.tree.leaves(by_hand.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(smoothed.params),
                                                      jax.tree.leaves(plain.params), strict=True))
    assert m1.compute()["accuracy"] == m2.compute()["accuracy"]  # labels: the argmax of the targets


def test_a_non_finite_step_is_counted_and_changes_nothing():
    """The step's guard: a NaN loss (here from one NaN target) leaves step, weights, BatchNorm
    statistics and optimiser state as they were, and counts itself in the `nonfinite` metric."""
    step, _, state, batch = _step_setup()
    target = batch["target"].copy()
    target[0, 0] = np.nan
    after, metrics = step({**batch, "target": target})
    assert float(metrics.compute()["nonfinite"]) == 1.0
    assert int(after.step) == int(state.step) == 0
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    _, finite = step(batch)
    assert float(finite.compute()["nonfinite"]) == 0.0


def test_the_loop_stops_on_a_non_finite_step_and_names_the_last_good_checkpoint():
    from fermsca import train

    class Checkpoints:  # the part of checkpoint.RunCheckpoints that the check reads
        waited = False
        latest = types.SimpleNamespace(latest_step=lambda: 16, directory="/run/checkpoints")

        def wait(self):
            self.waited = True

    ckpts = Checkpoints()
    train._check_finite({"nonfinite": 0.0, "loss": 0.5}, 20, ckpts)
    for computed in ({"nonfinite": 1.0, "loss": 0.5}, {"nonfinite": 0.0, "loss": float("nan")}):
        with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss or gradient before step 20; "
                           r"the run is stopped\. Last good checkpoint: step 16 in /run/checkpoints"):
            train._check_finite(computed, 20, ckpts)
    assert ckpts.waited  # the last checkpoint is on disk before the error is raised


def test_mixup_in_the_train_step_changes_the_update_and_keeps_it_finite():
    mix_step, _, _, batch = _step_setup(mixup_alpha=0.4)
    mixed, m = mix_step(batch)
    plain, _ = _step_setup()[0](batch)
    assert float(m.compute()["nonfinite"]) == 0
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(mixed.params),
                                                      jax.tree.leaves(plain.params), strict=True))


def test_class_weights_weight_each_example_by_its_target():
    """train_step with class_weights w: each example's loss times targets @ w (here one-hot: w[y])."""
    from fermsca import augment, losses

    step, model, state, batch = _step_setup()
    w = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    _, weighted = step(batch, class_weights=w)
    _, plain = step(batch)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         augment.preprocess(batch["image"]), train=True, mutable=["batch_stats"])[0]
    per_example = np.asarray(losses.cosine_similarity_loss(logits, batch["target"]))
    labels = batch["target"].argmax(axis=1)
    np.testing.assert_allclose(float(plain.compute()["loss"]), per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(weighted.compute()["loss"]), (per_example * w[labels]).mean(),
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Steps per dispatch and the weight average, in this process on the linear model.

EMA_DECAY = 0.9


@pytest.fixture(scope="module")
def dispatch_runs():
    """Four steps of a Trainer (linear model, EMA on, flips but no affine augmentation) one at a
    time and as one `train_chunk`: (states after each single step, their metrics, the chunk's state
    and metrics, the initial state)."""
    from configs import default
    from fermsca import train

    config = default.get_config()
    config.augment.update(shift=0.0, rotation=0.0, zoom=0.0, flip=True)
    config.ema_decay = EMA_DECAY
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = 0.05
    trainer = train.Trainer(config, num_classes=4, steps_per_epoch=100, mesh=train.make_mesh(),
                            model=_Linear())
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (8, 48, 48, 1), dtype=np.uint8),
                "target": np.eye(4, dtype=np.float32)[rng.integers(0, 4, 8)]} for _ in range(4)]
    initial = jax.device_get(trainer.init_state())
    state, states, metrics = trainer.init_state(), [], []
    for batch in batches:
        state, m = trainer.train(state, batch)
        states.append(jax.device_get(state))
        metrics.append(m)
    chunk_state, chunk_metrics = trainer.train_chunk(trainer.init_state(), batches)
    return trainer, initial, states, metrics, jax.device_get(chunk_state), chunk_metrics


def test_steps_per_dispatch_trains_exactly_as_one_step_at_a_time(dispatch_runs):
    from fermsca import train

    _, _, states, metrics, chunk_state, chunk_metrics = dispatch_runs
    assert type(chunk_state) is train.EMATrainState and int(chunk_state.step) == 4
    flat_one = jax.tree_util.tree_flatten_with_path(states[-1])[0]
    flat_chunk = jax.tree_util.tree_flatten_with_path(chunk_state)[0]
    assert [p for p, _ in flat_one] == [p for p, _ in flat_chunk]
    # params, Adam's moments, BatchNorm statistics, the EMA and the step counter
    for (path, a), (_, b) in zip(flat_one, flat_chunk, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert not np.allclose(states[-1].params["Dense_0"]["kernel"], states[0].params["Dense_0"]["kernel"])
    for i, m in enumerate(metrics):  # every step's metrics
        step_i = jax.tree.map(lambda x, i=i: x[i], chunk_metrics)
        for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(step_i), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    window = train._StepMetrics()
    for i in range(4):
        window.add(chunk_metrics, i)
    by_hand = functools.reduce(lambda a, b: a.merge(b), metrics).compute()
    computed = window.compute()
    for name in ("loss", "accuracy", "nonfinite"):
        np.testing.assert_allclose(computed[name], float(by_hand[name]), rtol=1e-6)


def test_ema_decay_warms_up_as_tensorflows_moving_average():
    from fermsca import train

    # tf.train.ExponentialMovingAverage(decay, num_updates=t): min(decay, (1 + t) / (10 + t))
    for t, expected in ((0, 0.1), (8, 0.5), (90, 0.91), (989, 990 / 999), (10_000, 0.999)):
        np.testing.assert_allclose(float(train.ema_decay_at(t, 0.999)), expected, rtol=1e-6)
    assert float(train.ema_decay_at(np.int32(5), 0.2)) == pytest.approx(0.2)  # the cap


def test_ema_is_the_exponential_average_of_each_steps_weights(dispatch_runs):
    """ema_0 = initial weights, then after step t (from 0) ema = d_t ema + (1 - d_t) w, with
    d_t = min(d, (1 + t) / (10 + t)) (TensorFlow's warm-up), over params and BatchNorm statistics."""
    _, initial, states, _, chunk_state, _ = dispatch_runs

    def weights(s):
        return {"params": s.params, "batch_stats": s.batch_stats}

    expected = jax.tree.map(lambda x: np.asarray(x, np.float64), weights(initial))
    for t, s in enumerate(states):
        d = min(EMA_DECAY, (1 + t) / (10 + t))  # 0.1, 2/11, 0.25, 4/13: the warm-up, under d = 0.9
        expected = jax.tree.map(lambda e, w, d=d: d * e + (1 - d) * np.asarray(w, np.float64),
                                expected, weights(s))
    assert jax.tree.structure(expected) == jax.tree.structure(chunk_state.ema)
    for e, got_one, got_chunk in zip(jax.tree.leaves(expected), jax.tree.leaves(states[-1].ema),
                                     jax.tree.leaves(chunk_state.ema), strict=True):
        np.testing.assert_allclose(got_one, e, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_chunk, e, rtol=1e-5, atol=1e-6)
    # The average lags the weights: it differs from the last step's.
    assert not np.allclose(states[-1].ema["params"]["Dense_0"]["kernel"],
                           states[-1].params["Dense_0"]["kernel"])


def test_evaluation_uses_the_ema(dispatch_runs):
    from fermsca import train

    trainer, _, states, _, _, _ = dispatch_runs
    state = states[-1]
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (8, 48, 48, 1), dtype=np.uint8),
             "target": np.eye(4, dtype=np.float32)[rng.integers(0, 4, 8)],
             "mask": np.ones(8, np.float32)}
    as_plain = train.TrainState(step=state.step, params=state.ema["params"],
                                batch_stats=state.ema["batch_stats"], opt_state=state.opt_state)
    raw = train.TrainState(step=state.step, params=state.params, batch_stats=state.batch_stats,
                           opt_state=state.opt_state)
    batch = train.global_batch(batch, trainer.batch_sharding)
    ema_loss, plain_loss, raw_loss = (float(trainer.eval_step(trainer.place(s), batch)[0].compute()["loss"])
                                      for s in (state, as_plain, raw))
    assert ema_loss == plain_loss and ema_loss != raw_loss


@pytest.mark.parametrize("start, stop, per_epoch, k, every, sizes", [
    (0, 20, 10, 1, 0, [1] * 20),
    (0, 20, 10, 4, 0, [4, 4, 1, 1, 4, 4, 1, 1]),  # epoch ends at 10 and 20
    (0, 16, 8, 4, 0, [4, 4, 4, 4]),
    (3, 12, 8, 4, 0, [4, 1, 4]),  # a resume mid-epoch
    (0, 10, 100, 4, 6, [4, 1, 1, 4]),  # checkpoint_every_steps=6, stop (max_steps) at 10
])
def test_dispatch_sizes_end_a_dispatch_at_every_epoch_end_and_checkpoint(start, stop, per_epoch, k,
                                                                         every, sizes):
    from fermsca import train

    got = list(train.dispatch_sizes(start, stop, per_epoch, k, every))
    assert got == sizes and sum(got) == stop - start


def test_ema_state_checkpoints_resume_exactly_and_inference_reads_the_ema(dispatch_runs, tmp_path):
    from fermsca import train

    trainer, _, states, _, _, _ = dispatch_runs
    state = states[-1]
    ckpts = checkpoint.RunCheckpoints(str(tmp_path / "run"), asynchronous=False)
    ckpts.save(4, trainer.place(state), {"config": trainer.config.to_json(), "class_names": list("abcd")},
               val_accuracy=0.5)
    restored, _ = ckpts.restore_latest(trainer.abstract_state())
    ckpts.close()
    assert type(restored) is train.EMATrainState
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    variables, _ = checkpoint.load_checkpoint(str(tmp_path / "run"))  # what fermsca.inference loads
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(state.ema), strict=True):
        np.testing.assert_array_equal(a, b)
    # A run without the average cannot resume from this one's state, and says why.
    plain = train.TrainState(step=state.step, params=state.params, batch_stats=state.batch_stats,
                             opt_state=state.opt_state)
    with pytest.raises(checkpoint.CheckpointError, match=r"ema/params/Dense_0/kernel: in the checkpoint, "
                                                         r"unknown to the config"):
        checkpoint.RunCheckpoints(str(tmp_path / "run")).restore_latest(jax.eval_shape(lambda: plain))


def test_checkpoint_without_ema_still_loads(workdir, tiny_model):
    """A checkpoint of a run before (or without) the average: inference takes its params."""
    from fermsca import inference

    _, _, variables = tiny_model
    loaded = inference.load(workdir)
    for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # a CLI run (about 30 s); the step-level equality tests above are in the suite
def test_steps_per_dispatch_in_the_loop_trains_as_the_reference(tmp_path, data_dir, reference_run):
    """The CLI with 3 steps per dispatch from the training split on the device: 8 steps an epoch run
    as 3 + 3 + 1 + 1, and logs every 4 steps fall inside a dispatch; same history, checkpoints and
    parameters as one step at a time from host batches. (Sharded over 8 devices:
    test_eight_simulated_devices_match_one; host batches 3 at a time:
    test_split_on_the_device_trains_exactly_as_host_batches.)"""
    workdir = str(tmp_path / "chunked")
    proc = run_main(workdir, data_dir, "--config.steps_per_dispatch=3", "--config.data_on_device=on")
    assert "training split on the device: 256 examples" in proc.stderr
    assert_same_params(final_params(reference_run[0]), final_params(workdir), rtol=1e-6, atol=1e-7)
    with open(os.path.join(reference_run[0], "results.json")) as f:
        reference = json.load(f)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["steps"] == 24 and committed_steps(workdir) == [16, 24]
    assert results["train_data_on_device"] is True
    for want, got in zip(reference["history"], results["history"], strict=True):
        assert want.keys() == got.keys() and want["epoch"] == got["epoch"]
        for key in ("train_loss", "train_accuracy", "validation_loss", "validation_accuracy",
                    "learning_rate"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def test_cross_validation_refuses_the_ema(tmp_path):
    from configs import default
    from fermsca import cli, crossval

    config = default.get_config()
    config.ema_decay = 0.999
    with pytest.raises(cli.ConfigError, match=r"config.ema_decay is not supported by cross-validation"):
        crossval.train_folds(config, [0], str(tmp_path), load=lambda *a: pytest.fail("loaded data"))


def test_cross_validation_refuses_training_on_every_image(tmp_path):
    from configs import ckplus
    from fermsca import cli, crossval

    config = ckplus.get_config()
    config.dataset.protocol = "all"
    with pytest.raises(cli.ConfigError, match=r"protocol='all' has no test folds to cross-validate"):
        crossval.train_folds(config, [0], str(tmp_path), load=lambda *a: pytest.fail("loaded data"))


@pytest.mark.slow  # builds a CK+ set and trains in this process (about 15 s); tests/test_run_record.py
# and tests/test_ckplus.py test the parts in the suite
def test_training_on_every_image_validates_nothing_and_keeps_the_last_checkpoint(tmp_path):
    """CK+ protocol 'all' (the released model after cross-validation): no validation split, so no
    best checkpoint, no final evaluation; the last checkpoint loads for inference."""
    import fixtures

    from configs import ckplus
    from fermsca import inference, run_record, train
    from fermsca.datasets import ckplus as ckplus_data

    rng = np.random.default_rng(0)
    classes = ["anger", "happy", "surprise"]
    fixtures.write_ckplus48(tmp_path / "raw", [
        (classes[i // 3 % 3], f"S{10 + i // 3:03d}_001_{i % 3:08d}.png", fixtures.noise_image(rng))
        for i in range(24)])
    config = ckplus.get_config()
    config.dataset.update(protocol="all", manual_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "tfds"))
    config.model.update(stem_width=4, widths=(4,))
    config.update(num_epochs=2, batch_size=8, eval_batch_size=8, log_every_steps=3,
                  async_checkpoints=False)
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)

    assert results["status"] == "completed" and results["dataset"]["split_sizes"] == {"train": 24}
    assert results["evaluated_split"] is None and results["evaluations"] == {}
    assert results["accuracy"] is None and results["best_validation_accuracy"] is None
    assert [h["epoch"] for h in results["history"]] == [1.0, 2.0]
    assert all(h["validation_accuracy"] is None and 0 <= h["train_accuracy"] <= 1
               for h in results["history"])
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["evaluated_split"] is None
    assert committed_steps(workdir) == [3, 6]  # every epoch
    best = os.path.join(workdir, checkpoint.BEST_DIR)
    assert not os.path.isdir(best) or not [s for s in os.listdir(best) if s.isdigit()]
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))
    model = inference.load(workdir)
    assert model.class_names == tuple(ckplus_data.CLASS_NAMES) and model.step == 6
    line = run_record.summary_line(results, "r.json")
    assert line == (f"trained on every image (no validation or test split), last epoch's train "
                    f"accuracy {results['history'][-1]['train_accuracy']:.4f} -> r.json")


# ------------------------------------------------------------------------------------------------
# The training split on the device: index batches gathered in the step, in this process on the
# linear model.

@pytest.fixture(scope="module")
def feed_trainer():
    """A Trainer (linear model, flips but no affine augmentation, batch 8) and a 44-example split
    with soft targets: 5 steps an epoch, 4 examples dropped from each."""
    import types

    from configs import default
    from fermsca import train

    config = default.get_config()
    config.augment.update(shift=0.0, rotation=0.0, zoom=0.0, flip=True)
    config.optimizer.schedule = "constant"
    config.optimizer.learning_rate = 0.05
    config.batch_size = 8
    trainer = train.Trainer(config, num_classes=4, steps_per_epoch=5, mesh=train.make_mesh(),
                            model=_Linear())
    rng = np.random.default_rng(0)
    targets = rng.random((44, 4)).astype(np.float32)
    targets /= targets.sum(axis=1, keepdims=True)
    split = types.SimpleNamespace(images=rng.integers(0, 256, (44, 48, 48, 1), dtype=np.uint8),
                                  targets=targets, sample_labels=False)
    return trainer, split


def _train_feed(trainer, split, on_device, steps_per_dispatch, start=0, stop=9, state=None):
    """Steps `start`..`stop` as the loop runs them: host batches (`train_iterator`) or index batches
    gathered from the split on the device (`train_index_iterator`), `dispatch_sizes` at a time."""
    from fermsca import input_pipeline, train

    data = trainer.put_train_split(split) if on_device else None
    batches = input_pipeline.train_index_iterator if on_device else input_pipeline.train_iterator
    batches = batches(split, global_batch_size=8, seed=3, start_step=start)
    state = trainer.init_state() if state is None else state
    for size in train.dispatch_sizes(start, stop, 5, steps_per_dispatch):
        if size == 1:
            state, _ = trainer.train(state, next(batches), data)
        else:
            state, _ = trainer.train_chunk(state, [next(batches) for _ in range(size)], data)
    return state


@pytest.mark.parametrize("sample_labels", [False, True])
def test_split_on_the_device_trains_exactly_as_host_batches(feed_trainer, sample_labels):
    """9 steps over an epoch end: host batches one step per call; on-device gathers one step per
    call, 3 per call (3 + 1 + 1 + 3 + 1) and resumed from mid-epoch step 4 (1 + 3 + 1). Same
    parameters, Adam moments, BatchNorm statistics and step, bit for bit; FER+ label drawing too."""
    trainer, split = feed_trainer
    split = type(split)(images=split.images, targets=split.targets, sample_labels=sample_labels)
    host = jax.device_get(_train_feed(trainer, split, False, 1))
    runs = {"K=1": _train_feed(trainer, split, True, 1), "K=3": _train_feed(trainer, split, True, 3)}
    first = _train_feed(trainer, split, True, 3, stop=4)
    runs["resumed"] = _train_feed(trainer, split, True, 3, start=4,
                                  state=trainer.place(jax.device_get(first)))
    assert int(host.step) == 9
    flat_host = jax.tree_util.tree_flatten_with_path(host)[0]
    for name, state in runs.items():
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
        assert [p for p, _ in flat] == [p for p, _ in flat_host]
        for (path, a), (_, b) in zip(flat_host, flat, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} {jax.tree_util.keystr(path)}")
    # The draws matter: hard targets of the same examples train to other weights.
    other = type(split)(images=split.images, targets=split.targets, sample_labels=not sample_labels)
    moved = jax.device_get(_train_feed(trainer, other, True, 3))
    assert not np.allclose(moved.params["Dense_0"]["kernel"], host.params["Dense_0"]["kernel"])


def test_a_split_too_large_for_the_device_is_refused_or_left_on_the_host(feed_trainer, monkeypatch,
                                                                         caplog):
    """config.data_on_device: "on" fails, naming the field, and "auto" logs and feeds host batches,
    where the split needs more than a quarter of a device's free memory; "off" never asks."""
    from fermsca import cli, train

    trainer, split = feed_trainer
    needed = split.images.nbytes + split.targets.nbytes
    caplog.set_level(logging.INFO)

    class Device:
        def __init__(self, free):
            self.free = free

        def memory_stats(self):
            return {"bytes_limit": self.free + 1000, "bytes_in_use": 1000}

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = trainer.config.copy_and_resolve_references()
    for setting, free, placed in (("on", 4 * needed, True), ("auto", 4 * needed, True),
                                  ("auto", 4 * needed - 1, False), ("off", 10**12, False)):
        monkeypatch.setattr(jax, "local_devices", lambda free=free: [Device(10**12), Device(free)])
        config.data_on_device = setting
        data = train._device_train_split(config, trainer, split)
        assert (data is not None) == placed, (setting, free)
        if placed:
            np.testing.assert_array_equal(np.asarray(data["image"]), split.images)
            np.testing.assert_array_equal(np.asarray(data["target"]), split.targets)
    mib = f"{needed / 2**20:.1f} MiB"  # 0.1
    assert f"config.data_on_device='auto': the training split needs {mib} on each device, more than " \
           f"25% of local device 1's free {(4 * needed - 1) / 2**20:.1f} MiB; batches come from the host " \
           "pipeline" in caplog.text
    config.data_on_device = "on"
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(4 * needed - 1)])
    with pytest.raises(cli.ConfigError, match=rf"config.data_on_device='on': the training split needs "
                                              rf"{mib} .* set it to 'auto' or 'off'"):
        train._device_train_split(config, trainer, split)


@pytest.mark.slow  # two trainers compiled (about 40 s)
def test_bfloat16_convolutions_train_a_float32_model_close_to_float32():
    """config.model.conv_dtype=bfloat16 (on XLA here, so it runs on any CPU): parameters and the loss
    stay float32, and two steps land near the float32 run's parameters without equalling them."""
    from configs import default
    from fermsca import train

    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (8, 48, 48, 1), dtype=np.uint8),
                "target": np.eye(4, dtype=np.float32)[rng.integers(0, 4, 8)]} for _ in range(2)]
    params = {}
    for conv_dtype in ("float32", "bfloat16"):
        config = default.get_config()
        config.model.update(stem_width=8, widths=(8, 16, 16), conv_impl="xla", conv_dtype=conv_dtype)
        trainer = train.Trainer(config, num_classes=4, steps_per_epoch=100, mesh=train.make_mesh())
        state = trainer.init_state()
        for batch in batches:
            state, metrics = trainer.train(state, batch)
        assert np.isfinite(float(metrics.compute()["loss"]))
        params[conv_dtype] = jax.device_get(state.params)
    leaves = zip(jax.tree.leaves(params["float32"]), jax.tree.leaves(params["bfloat16"]), strict=True)
    differ = False
    for a, b in leaves:
        assert b.dtype == np.float32
        # Adam moves each parameter by up to about the learning rate (1e-3) a step whatever the
        # gradient's size, so where a gradient is near zero the two runs may step apart by 2e-3 each.
        np.testing.assert_allclose(b, a, rtol=0, atol=4.5e-3 + 0.02 * np.abs(a).max())
        differ |= not np.array_equal(a, b)
    assert differ
