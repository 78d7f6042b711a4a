"""experiments/perf/gpu_step.py on this machine's backend, at its smallest: it runs and its record
holds what the projection needs."""

import json

from experiments.perf import gpu_step


def test_host_batches_are_distinct_ferplus_shaped_batches():
    batches = gpu_step.host_batches(2, 4)
    assert [b["image"].shape for b in batches] == [(4, 48, 48, 1)] * 2
    assert batches[0]["target"].shape == (4, gpu_step.NUM_CLASSES)
    assert (batches[0]["image"] != batches[1]["image"]).any()


def test_quick_run_writes_the_projection(tmp_path):
    out = tmp_path / "step.json"
    gpu_step.run(["--quick", "--steps_per_dispatch", "2", "--epochs", "10", "--output", str(out)])
    record = json.loads(out.read_text())
    assert record["backend"] == "cpu" and record["train_images"] == 256
    (result,) = record["results"]
    assert result["batch_size"] == 8 and result["steps_per_dispatch"] == 2
    assert result["images_per_second"] > 0 and len(result["rounds"]) == 1
    assert abs(result["projected_hours"] - 256 / result["images_per_second"] * 10 / 3600) < 1e-12
