"""What a run records: the results.json fields, versions, git commit, hyperparameters, stall warnings.

The training-loop side (a real run writing results.json and its figures) is in test_train.py.
"""

import datetime
import json
import re
import time
import types

import numpy as np
import pytest

from configs import default
from fermsca import config_schema, hostenv, run_record

RESULTS_KEYS = [
    "config", "dataset", "evaluated_split", "evaluations", "accuracy", "best_validation_accuracy",
    "epochs", "steps", "history", "parameters", "versions", "device_kind", "platform",
    "device_count", "process_count", "host", "git_commit", "seed",
]


def _data():
    """The fields of `fermsca.datasets.Dataset` the record reads."""
    split = lambda n, counts: types.SimpleNamespace(images=np.zeros((n, 48, 48, 1), np.uint8),
                                                    counts=counts)
    return types.SimpleNamespace(
        name="synthetic_faces", class_names=("a", "b"), source=None,
        splits={"train": split(6, {"total": 10, "kept": 10, "train_subset": 6}),
                "validation": split(4, {"total": 4, "kept": 4}),
                "test": split(3, {"total": 3, "kept": 3})})


def _history():
    return [run_record.epoch_row(1.0, {"loss": -0.2, "accuracy": 0.5},
                                 {"loss": -0.3, "accuracy": 0.75}, 1e-3),
            run_record.epoch_row(2.0, {"loss": -0.4, "accuracy": 0.6},
                                 {"loss": -0.35, "accuracy": 0.5}, 5e-4)]


def test_stall_warning():
    names = ("a", "b", "c")
    learning = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 3]])
    history = [{"epoch": 1, "train_loss": -0.30}, {"epoch": 2, "train_loss": -0.35}]
    assert run_record.stall_warning(history, learning, names) is None
    one_class = np.array([[0, 4, 0], [0, 3, 0], [0, 4, 0]])
    assert run_record.stall_warning(history, one_class, names).startswith(
        "epoch 2: every validation image is predicted as 'b'")
    flat = [{"epoch": 1, "train_loss": -0.125}, {"epoch": 2, "train_loss": -0.125}]
    assert "the training loss stopped moving (-0.125" in run_record.stall_warning(flat, learning, names)
    assert run_record.stall_warning(flat[:1], learning, names) is None
    # Without a validation split (every image in train) only the training loss is watched.
    assert run_record.stall_warning(history, None, names) is None
    assert "stopped moving" in run_record.stall_warning(flat, None, names)


def test_epoch_row():
    row = run_record.epoch_row(0.5, {"loss": 1.0, "accuracy": 0.25}, {"loss": 2.0, "accuracy": 0.5}, 0.1)
    assert row == {"epoch": 0.5, "train_loss": 1.0, "train_accuracy": 0.25, "validation_loss": 2.0,
                   "validation_accuracy": 0.5, "learning_rate": 0.1}
    assert run_record.epoch_row(1.0, {"loss": 1.0, "accuracy": 0.25}, None, 0.1) == {
        "epoch": 1.0, "train_loss": 1.0, "train_accuracy": 0.25, "validation_loss": None,
        "validation_accuracy": None, "learning_rate": 0.1}


def test_hparams_name_every_field_and_write_non_scalars_as_text():
    hparams = run_record.hparams(default.get_config())
    assert set(hparams) == set(config_schema.FIELDS)
    assert hparams["model.widths"] == "(64, 128, 256)"
    assert hparams["dataset.data_dir"] == "None"
    assert hparams["model.use_se"] is True and hparams["seed"] == 0 and hparams["loss"] == "cosine"


def test_evaluation_adds_loss_step_and_epoch_to_the_metrics():
    result = {"loss": -0.5, "confusion_matrix": np.array([[3, 1], [0, 4]])}
    summary = run_record.evaluation(result, ("a", "b"), step=30, steps_per_epoch=10)
    assert summary["accuracy"] == 7 / 8 and summary["num_examples"] == 8
    assert summary["confusion_matrix"] == [[3, 1], [0, 4]]
    assert (summary["loss"], summary["step"], summary["epoch"]) == (-0.5, 30, 3.0)


def test_results_record():
    config = default.get_config()
    config.seed = 7
    names = ("a", "b")
    best = run_record.evaluation({"loss": 0.1, "confusion_matrix": np.eye(2, dtype=int) * 2}, names, 8, 4)
    last = run_record.evaluation({"loss": 0.2, "confusion_matrix": np.array([[1, 1], [0, 1]])}, names, 12, 4)
    history = _history()
    results = run_record.results(config, _data(), "test", {"best": best, "last": last}, history,
                                 num_steps=12, steps_per_epoch=4, parameters=1234)
    assert list(results) == RESULTS_KEYS
    assert results["config"] == json.loads(config.to_json())
    assert results["dataset"] == {
        "name": "synthetic_faces", "class_names": ["a", "b"],
        "split_sizes": {"train": 6, "validation": 4, "test": 3},
        "split_counts": {"train": {"total": 10, "kept": 10, "train_subset": 6},
                         "validation": {"total": 4, "kept": 4}, "test": {"total": 3, "kept": 3}},
        "source": None}
    assert results["accuracy"] == 1.0  # the best checkpoint's
    assert results["best_validation_accuracy"] == 0.75
    assert (results["epochs"], results["steps"], results["parameters"], results["seed"]) == (3, 12, 1234, 7)
    assert results["history"] == history and results["evaluated_split"] == "test"
    assert results["device_count"] >= 1 and results["process_count"] == 1
    assert set(results["host"]) == {"machine", "cpu_count", "processor", "cpu"}
    assert results["host"]["cpu"] == hostenv.cpu()["name"]
    assert set(results["versions"]) >= {"fermsca", "jax", "flax", "optax", "orbax_checkpoint",
                                        "tensorflow_datasets", "python"}
    commit = results["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    json.dumps(results)  # all plain JSON

    without_best = run_record.results(config, _data(), "validation", {"last": last}, [], 12, 4, 1234)
    assert without_best["accuracy"] == 2 / 3 and without_best["best_validation_accuracy"] is None

    train_only = [run_record.epoch_row(1.0, {"loss": -0.2, "accuracy": 0.5}, None, 1e-3)]
    nothing_held_out = run_record.results(config, _data(), None, {}, train_only, 4, 4, 1234)
    assert nothing_held_out["evaluated_split"] is None and nothing_held_out["evaluations"] == {}
    assert nothing_held_out["accuracy"] is None and nothing_held_out["best_validation_accuracy"] is None


def test_write_results(tmp_path):
    path = run_record.write_results(str(tmp_path), {"status": "completed", "accuracy": 0.5})
    assert path == str(tmp_path / "results.json")
    with open(path) as f:
        assert json.load(f) == {"status": "completed", "accuracy": 0.5}


def test_summary_line():
    evaluated = {"evaluated_split": "test", "history": [],
                 "evaluations": {"best": {"accuracy": 0.91234, "macro_f1": 0.8},
                                 "last": {"accuracy": 0.9, "macro_f1": 0.7}}}
    assert run_record.summary_line(evaluated, "w/results.json") == \
        "test accuracy 0.9123 (macro F1 0.8000) -> w/results.json"
    del evaluated["evaluations"]["best"]
    assert run_record.summary_line(evaluated, "r") == "test accuracy 0.9000 (macro F1 0.7000) -> r"
    trained_on_all = {"evaluated_split": None, "evaluations": {},
                      "history": [{"train_accuracy": 0.5}, {"train_accuracy": 0.987}]}
    assert run_record.summary_line(trained_on_all, "r") == ("trained on every image (no validation or test "
                                                      "split), last epoch's train accuracy 0.9870 -> r")


def test_write_figures_with_and_without_a_held_out_split(tmp_path):
    names = ("a", "b")
    last = run_record.evaluation({"loss": 0.2, "confusion_matrix": np.array([[1, 1], [0, 1]])}, names, 12, 4)
    (tmp_path / "evaluated").mkdir()
    (tmp_path / "all").mkdir()
    run_record.write_figures(str(tmp_path / "evaluated"), _data(), "test", {"last": last}, _history())
    assert sorted(p.name for p in (tmp_path / "evaluated").iterdir()) == [
        "confusion_matrix_last.png", "training_curves.png"]
    # Trained on every image: no validation in the history, nothing evaluated, curves of train only.
    train_only = [run_record.epoch_row(e, {"loss": -0.1 * e, "accuracy": 0.3 * e}, None, 1e-3)
                  for e in (1.0, 2.0)]
    run_record.write_figures(str(tmp_path / "all"), _data(), None, {}, train_only)
    assert [p.name for p in (tmp_path / "all").iterdir()] == ["training_curves.png"]


def test_write_progress_replaces_the_record_whole(tmp_path):
    config = default.get_config()
    rows = [run_record.epoch_row(1.0, {"loss": 0.5, "accuracy": 0.6}, None, 1e-3),
            run_record.epoch_row(2.0, {"loss": 0.4, "accuracy": 0.7},
                                 {"loss": 0.45, "accuracy": 0.65}, 1e-3)]
    env = run_record.environment()
    path = run_record.write_progress(str(tmp_path), config, "running", 10, 40, 10, rows[:1], env)
    with open(path) as f:
        first = json.load(f)
    assert (first["status"], first["step"], first["epoch"], first["num_epochs"]) == ("running", 10, 1.0, 4.0)
    assert first["best_validation_accuracy"] is None and first["history"] == rows[:1]
    run_record.write_progress(str(tmp_path), config, "preempted", 25, 40, 10, rows, env)
    with open(path) as f:
        second = json.load(f)
    assert (second["status"], second["epoch"], second["best_validation_accuracy"]) == ("preempted", 2.5, 0.65)
    assert second["config"] == json.loads(config.to_json()) and "git_commit" in second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.json"]  # no temporary left
    assert "seconds_per_epoch" not in second  # no leg given: no pace
    written = datetime.datetime.fromisoformat(second["updated"])
    assert written.tzinfo is not None and abs(time.time() - written.timestamp()) < 60
    # A resumed leg: from step 10, 15 steps in 30 s -> 20 s an epoch of 10 steps, 15 steps left
    run_record.write_progress(str(tmp_path), config, "running", 25, 40, 10, rows, env,
                              leg=(10, time.time() - 30.0))
    with open(path) as f:
        third = json.load(f)
    assert third["seconds_per_epoch"] == pytest.approx(20.0, rel=0.05)
    assert third["estimated_seconds_left"] == pytest.approx(30.0, rel=0.05)


def test_pace_is_this_legs_wall_time_per_step():
    assert run_record.pace(25, 40, 10, 10, 30.0) == {"seconds_per_epoch": 20.0,
                                                     "estimated_seconds_left": 30.0}
    assert run_record.pace(40, 40, 10, 0, 80.0)["estimated_seconds_left"] == 0.0
    assert run_record.pace(10, 40, 10, 10, 5.0) == {"seconds_per_epoch": None,
                                                    "estimated_seconds_left": None}
