"""Evaluation of a checkpoint: metrics against hand-counted values, the CLI's files and errors."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tiny_run

from fermsca import datasets, evaluate, inference

CLASS_NAMES = tiny_run.CLASS_NAMES


@dataclasses.dataclass(frozen=True)
class FakeSplit:
    """The fields of `fermsca.datasets.Split` that evaluation reads."""

    images: np.ndarray
    targets: np.ndarray


@dataclasses.dataclass(frozen=True)
class FakeDataset:
    name: str
    class_names: tuple
    splits: dict
    source: dict | None = None


def tiny_split(n: int = 40, seed: int = 0) -> FakeSplit:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 48, 48, 1), dtype=np.uint8)
    votes = rng.integers(0, 4, (n, len(CLASS_NAMES))).astype(np.float32) + 0.01
    return FakeSplit(images, votes / votes.sum(1, keepdims=True))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint of a tiny FERNet with random weights, in a training run's layout."""
    config = tiny_run.tiny_config()
    config.dataset.name = "ferplus"
    config.dataset.manual_dir = "/from/the/training/config"
    variables = tiny_run.random_variables(inference.build_model(config.model, len(CLASS_NAMES)), 0)
    return tiny_run.save_run_checkpoint(str(tmp_path_factory.mktemp("run")), config, variables, step=7)


def test_confusion_matrix_counts_true_by_predicted():
    cm = evaluate.confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def test_evaluate_split_metrics_by_hand():
    names = ["a", "b", "c"]
    targets = np.eye(3, dtype=np.float32)[[0, 0, 1, 2, 2, 2]]
    targets[0] = [0.6, 0.4, 0.0]  # soft targets: the true class is the majority
    predicted = np.eye(3, dtype=np.float32)[[0, 1, 1, 2, 0, 2]]
    split = FakeSplit(np.zeros((6, 48, 48, 1), np.uint8), targets)
    metrics = evaluate.evaluate_split(lambda images: predicted, split, names)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_accuracy"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 2 / 3})
    f1 = {"a": 2 * 1 / (2 + 2), "b": 2 * 1 / (1 + 2), "c": 2 * 2 / (3 + 2)}
    assert metrics["per_class_f1"] == pytest.approx(f1)
    assert metrics["macro_f1"] == pytest.approx(np.mean(list(f1.values())))
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match="do not match"):
        evaluate.evaluate_split(lambda images: predicted, split, ["a", "b"])


def test_evaluate_split_with_the_model_matches_its_argmax(workdir):
    loaded = inference.load(workdir)
    split = tiny_split()
    classifier = loaded.classifier(batch_size=16)
    metrics = evaluate.evaluate_split(classifier, split, CLASS_NAMES)
    predicted = classifier(split.images).argmax(-1)
    truth = split.targets.argmax(-1)
    assert metrics["num_examples"] == 40
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == truth))
    assert np.sum(metrics["confusion_matrix"]) == 40


def fake_loader(calls: list, split: FakeSplit, name: str = "ferplus", class_names=CLASS_NAMES):
    def load(config, required=()):
        calls.append({"config": config.to_dict(), "required": tuple(required)})
        return FakeDataset(name, tuple(class_names), {"test": split})

    return load


def test_run_writes_json_and_figure_and_overrides_data_dirs(workdir, tmp_path, monkeypatch,
                                                            capsys):
    calls = []
    split = tiny_split()
    monkeypatch.setattr(datasets, "load", fake_loader(calls, split), raising=False)
    output = tmp_path / "out" / "ferplus_test.json"
    status = evaluate.main(["--checkpoint", workdir, "--manual_dir", str(tmp_path / "raw"),
                            "--data_dir", str(tmp_path / "tfds"), "--tta",
                            "--output", str(output)])
    assert status == 0
    assert calls[0]["required"] == ("test",)
    assert calls[0]["config"]["manual_dir"] == str(tmp_path / "raw")
    assert calls[0]["config"]["data_dir"] == str(tmp_path / "tfds")
    assert calls[0]["config"]["name"] == "ferplus"
    results = json.loads(output.read_text())
    assert os.path.getsize(tmp_path / "out" / "ferplus_test.png") > 0
    assert results["split"] == "test" and results["tta"] is True and results["step"] == 7
    assert results["class_names"] == CLASS_NAMES and results["num_examples"] == 40
    for key in ("accuracy", "per_class_accuracy", "per_class_f1", "macro_f1",
                "confusion_matrix"):
        assert key in results
    tta = inference.load(workdir).classifier(tta=True)
    expected = np.mean(tta(split.images).argmax(-1) == split.targets.argmax(-1))
    assert results["accuracy"] == pytest.approx(expected)
    line = capsys.readouterr().out
    assert line.startswith("ferplus test TTA, 10 views: accuracy ") and str(output) in line
    assert results["tta_views"] == 10 and results["tta_shift"] == inference.DEFAULT_TTA_SHIFT


def test_tta_shift_zero_averages_the_image_and_its_mirror(workdir, tmp_path, monkeypatch):
    split = tiny_split()
    monkeypatch.setattr(datasets, "load", fake_loader([], split), raising=False)
    monkeypatch.chdir(tmp_path)
    results = evaluate.run(workdir, tta=True, tta_shift=0)
    assert results["tta_views"] == 2 and results["tta_shift"] == 0
    assert (tmp_path / "eval_ferplus_test_tta_shift0.json").exists()
    # Independent of tta_views: the softmax of the image and of its mirror, averaged by hand.
    loaded = inference.load(workdir)
    plain = loaded.classifier(tta=False)
    probs = (np.asarray(plain(split.images)) + np.asarray(plain(split.images[:, :, ::-1, :]))) / 2
    expected = np.mean(probs.argmax(-1) == split.targets.argmax(-1))
    assert results["accuracy"] == pytest.approx(expected)


def test_tta_shift_needs_tta_and_a_non_negative_shift(workdir, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", workdir, "--tta_shift", "0"])
    assert "--tta_shift goes with --tta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", workdir, "--tta", "--tta_shift", "-1"])
    assert "--tta_shift -1: expected a number of pixels >= 0" in capsys.readouterr().err
    monkeypatch.setattr(datasets, "load", fake_loader([], tiny_split(8)), raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--tta_shift -1"):
        evaluate.run(workdir, tta=True, tta_shift=-1)


def test_run_keeps_the_config_data_dirs_by_default(workdir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load", fake_loader(calls, tiny_split(8)), raising=False)
    monkeypatch.chdir(tmp_path)
    results = evaluate.run(workdir)
    assert calls[0]["config"]["manual_dir"] == "/from/the/training/config"
    assert results["tta"] is False
    assert (tmp_path / "eval_ferplus_test.json").exists()
    assert (tmp_path / "eval_ferplus_test.png").exists()


def test_missing_split_error_surfaces(workdir, tmp_path, monkeypatch, capsys):
    def load(config, required=()):
        raise ValueError(f"{config.manual_dir}: no FER2013Test/ folder; add it to evaluate on "
                         "the test split")

    monkeypatch.setattr(datasets, "load", load, raising=False)
    status = evaluate.main(["--checkpoint", workdir, "--manual_dir", str(tmp_path),
                            "--output", str(tmp_path / "x.json")])
    assert status == 2
    assert f"{tmp_path}: no FER2013Test/ folder" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_class_names_must_match_the_checkpoint(workdir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load", fake_loader(calls, tiny_split(8),
                                                      class_names=CLASS_NAMES[::-1]),
                        raising=False)
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        evaluate.run(workdir, output=str(tmp_path / "x.json"))


def test_scores_the_whole_split_whatever_subset_trained_the_model(tmp_path, monkeypatch):
    config = tiny_run.tiny_config()
    config.dataset.train_subset = 16
    variables = tiny_run.random_variables(inference.build_model(config.model, len(CLASS_NAMES)), 0)
    run = tiny_run.save_run_checkpoint(str(tmp_path / "run"), config, variables, step=3)
    calls = []
    monkeypatch.setattr(datasets, "load", fake_loader(calls, tiny_split(8)), raising=False)
    evaluate.run(run, output=str(tmp_path / "x.json"))
    assert calls[0]["config"]["train_subset"] == 0


def test_a_checkpoint_config_without_a_dataset_field_is_named(tmp_path, monkeypatch, capsys):
    config = tiny_run.tiny_config()
    del config.dataset["rebuild"]  # as saved by a version before the field existed
    variables = tiny_run.random_variables(inference.build_model(config.model, len(CLASS_NAMES)), 0)
    run = tiny_run.save_run_checkpoint(str(tmp_path / "run"), config, variables, step=3)
    monkeypatch.setattr(datasets, "load", fake_loader([], tiny_split(8)), raising=False)
    status = evaluate.main(["--checkpoint", run, "--output", str(tmp_path / "x.json")])
    assert status == 2
    err = capsys.readouterr().err
    assert "has no config.dataset.rebuild" in err and "older fermsca" in err
