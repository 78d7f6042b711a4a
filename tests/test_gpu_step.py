"""experiments/perf/gpu_step.py on this machine's backend, at its smallest: it runs, times both feeds
(host batches, and indices into the split on the device) and its record holds what the projection
needs; without TensorFlow, the device feed runs and the host feed says what it needs."""

import json
import pathlib
import subprocess
import sys

import pytest

from experiments.perf import gpu_step
from fermsca import cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_synthetic_split_is_ferplus_shaped():
    split = gpu_step.synthetic_split(5)
    assert split.images.shape == (5, 48, 48, 1) and split.images.dtype.name == "uint8"
    assert split.targets.shape == (5, gpu_step.NUM_CLASSES) and (split.targets.sum(axis=1) == 1).all()
    assert not split.sample_labels and (split.images[0] != split.images[1]).any()


@pytest.mark.slow  # compiles the step for both feeds (about 30 s)
def test_quick_run_writes_the_projection(tmp_path):
    out = tmp_path / "step.json"
    gpu_step.run(["--quick", "--steps_per_dispatch", "2", "--epochs", "10", "--output", str(out)])
    record = json.loads(out.read_text())
    assert record["backend"] == "cpu" and record["train_images"] == 256 and record["data"] == "random"
    assert [(r["feed"], r["steps_per_dispatch"]) for r in record["results"]] == [("host", 2),
                                                                                  ("device", 2)]
    for result in record["results"]:
        assert result["batch_size"] == 8 and result["first_call_seconds"] > 0
        assert result["images_per_second"] > 0 and len(result["rounds"]) == 1
        assert abs(result["projected_hours"] - 256 / result["images_per_second"] * 10 / 3600) < 1e-12


def test_spent_budget_skips_and_bad_feed_is_refused(tmp_path):
    out = tmp_path / "step.json"
    gpu_step.run(["--quick", "--budget_seconds", "0", "--output", str(out)])
    results = json.loads(out.read_text())["results"]
    assert len(results) == 4 and all(r["skipped"] == "--budget_seconds spent" for r in results)
    with pytest.raises(cli.ConfigError, match="--feeds disk: host and/or device"):
        gpu_step.run(["--quick", "--feeds", "disk", "--output", str(out)])


# Runs gpu_step in a fresh interpreter where TensorFlow and TFDS cannot be imported (as on a GPU
# machine without them) and records every `import` statement that names them.
_WITHOUT_TF = """
import builtins, json, runpy, sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
attempts, builtin_import = [], builtins.__import__

def recording_import(name, *args, **kwargs):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
        attempts.append(name)
    return builtin_import(name, *args, **kwargs)

builtins.__import__ = recording_import
try:
    sys.argv = ["gpu_step", *sys.argv[1:]]
    runpy.run_module("experiments.perf.gpu_step", run_name="__main__")
finally:
    loaded = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")
              and sys.modules[m] is not None]
    print("TF:", json.dumps({"attempts": attempts, "loaded": loaded}))
"""


def _run_without_tf(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_TF, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _tf_record(stdout: str) -> dict:
    return json.loads(stdout.rsplit("TF: ", 1)[1])


def test_device_feed_runs_without_tensorflow(tmp_path):
    out = tmp_path / "step.json"
    done = _run_without_tf("--quick", "--feeds", "device", "--steps_per_dispatch", "1",
                           "--warmup", "0", "--seconds", "0.1", "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tf_record(done.stdout) == {"attempts": [], "loaded": []}
    (result,) = json.loads(out.read_text())["results"]
    assert result["feed"] == "device" and result["images_per_second"] > 0


def test_host_feed_without_tensorflow_says_it_needs_it(tmp_path):
    done = _run_without_tf("--quick", "--feeds", "host", "--output", str(tmp_path / "step.json"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --feeds host needs TensorFlow for its tf.data pipeline (pip install tensorflow); "
        "--feeds device does not")
    assert _tf_record(done.stdout)["loaded"] == [] and not (tmp_path / "step.json").exists()
