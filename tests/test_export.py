"""Exported SavedModel, TFLite and ONNX models compute what the JAX model computes."""

import json
import os

import numpy as np
import pytest
import tiny_run

from fermsca import export, inference

CLASS_NAMES = tiny_run.CLASS_NAMES

pytest.importorskip("tf2onnx", reason="ONNX export needs the [export] extra (tf2onnx)")
pytest.importorskip("onnxruntime", reason="ONNX checks need the [export] extra (onnxruntime)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint of a tiny FERNet with random weights whose outputs are far from uniform."""
    config = tiny_run.tiny_config()
    model = inference.build_model(config.model, len(CLASS_NAMES))
    variables = tiny_run.random_variables(model, 0, spread=2.0)
    return tiny_run.save_run_checkpoint(str(tmp_path_factory.mktemp("run")), config, variables, step=3)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    """The export of `workdir` in every format, made once per test run (the workers' `workdir`s
    hold the same weights): (outdir, its export.json)."""
    from conftest import built_once

    with built_once(tmp_path_factory, "export_all_formats") as (path, build):
        if build:
            export.export(workdir, str(path), export.FORMATS)
    with open(path / "export.json") as f:
        return str(path), json.load(f)


def fresh_inputs():
    """Faces none of the export's own checks used: real-looking values and a batch of one."""
    rng = np.random.default_rng(42)
    images = rng.integers(0, 256, (5, 48, 48, 1)).astype(np.uint8)
    images[2] = np.clip(np.arange(48)[:, None, None] * 5, 0, 255)
    images[3] = 255
    return images


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_exported_model_matches_jax(exported, workdir, fmt):
    outdir, _ = exported
    loaded = inference.load(workdir)
    images = fresh_inputs()
    reference = export.jax_probabilities(loaded, images)
    assert reference.max() > 0.5, "weights too weak for a meaningful comparison"
    path = os.path.join(outdir, export.FILES[fmt])
    got = export.RUNNERS[fmt](path, images.astype(np.float32))
    assert got.shape == (5, len(CLASS_NAMES)) and got.dtype == np.float32
    assert np.abs(got - reference).max() < 1e-4
    one = export.RUNNERS[fmt](path, images[:1].astype(np.float32))
    assert np.abs(one - reference[:1]).max() < 1e-4


def test_export_files_and_metadata(exported):
    outdir, result = exported
    assert sorted(os.listdir(outdir)) == ["export.json", "labels.txt", "model.onnx",
                                          "model.tflite", "savedmodel"]
    with open(os.path.join(outdir, "labels.txt")) as f:
        assert f.read().splitlines() == CLASS_NAMES
    with open(os.path.join(outdir, "export.json")) as f:
        meta = json.load(f)
    assert meta == result
    assert meta["class_names"] == CLASS_NAMES and meta["step"] == 3
    assert meta["input"]["shape"] == [None, 48, 48, 1] and meta["input"]["dtype"] == "float32"
    assert set(meta["max_abs_diff"]) == set(export.FORMATS)
    assert max(meta["max_abs_diff"].values()) < export.TOLERANCE


def test_onnx_names_and_dynamic_batch(exported):
    import onnx

    outdir, _ = exported
    model = onnx.load(os.path.join(outdir, "model.onnx"))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("images", "probabilities")
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == [
        "batch", 48, 48, 1]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 8]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == CLASS_NAMES


def test_uint8_input_and_intermediate_files_removed(workdir, tmp_path):
    outdir = str(tmp_path / "u8")
    result = export.export(workdir, outdir, ["tflite"], input_dtype="uint8", check=False)
    assert sorted(os.listdir(outdir)) == ["export.json", "labels.txt", "model.tflite"]
    assert result["input"]["dtype"] == "uint8" and "max_abs_diff" not in result
    images = fresh_inputs()
    reference = export.jax_probabilities(inference.load(workdir), images)
    got = export.run_tflite(os.path.join(outdir, "model.tflite"), images)
    assert np.abs(got - reference).max() < 1e-4


def test_bad_arguments(workdir, tmp_path, capsys):
    with pytest.raises(ValueError, match="formats"):
        export.export(workdir, str(tmp_path), ["pickle"])
    assert export.main(["--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
