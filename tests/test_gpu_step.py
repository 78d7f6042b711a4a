"""experiments/perf/gpu_step.py on this machine's backend, at its smallest: it runs, times both feeds
(host batches, and indices into the split on the device) and its record holds what the projection
needs."""

import json

import pytest

from experiments.perf import gpu_step
from fermsca import cli


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
