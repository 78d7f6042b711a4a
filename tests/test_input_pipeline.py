"""Input pipeline contracts: exactly-once evaluation, deterministic resumable training, sharding."""

import dataclasses
import itertools
import time

import numpy as np
import pytest

from fermsca import input_pipeline


@dataclasses.dataclass(frozen=True)
class _Split:
    """Stand-in with the fields of `fermsca.datasets.Split` the pipeline reads."""

    images: np.ndarray
    targets: np.ndarray
    sample_labels: bool = False


def _split(n: int, num_classes: int = 4, sample_labels: bool = False, soft=None) -> _Split:
    """Example i's image encodes i in its first two pixels; hard labels i mod K unless `soft`."""
    images = np.zeros((n, 6, 6, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 1, 0] = np.arange(n) // 256
    if soft is None:
        targets = np.eye(num_classes, dtype=np.float32)[np.arange(n) % num_classes]
    else:
        targets = np.tile(np.asarray(soft, np.float32), (n, 1))
    return _Split(images, targets, sample_labels)


def _ids(batch) -> np.ndarray:
    image = batch["image"].astype(np.int64)
    return image[:, 0, 0, 0] + 256 * image[:, 0, 1, 0]


def _take(iterator, steps: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, steps))


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_steps_per_epoch():
    assert input_pipeline.steps_per_epoch(28000, 128) == 218
    assert input_pipeline.steps_per_epoch(256, 128) == 2
    with pytest.raises(ValueError, match="do not fill one global batch"):
        input_pipeline.steps_per_epoch(100, 128)


@pytest.mark.parametrize(
    "n, global_batch, processes",
    [(10, 4, 1), (10, 4, 2), (3, 8, 2), (16, 8, 4), (17, 6, 3), (1, 4, 4), (5, 5, 1)],
)
def test_eval_sees_every_example_exactly_once(n, global_batch, processes):
    split = _split(n)
    per_process = [
        _take(
            input_pipeline.eval_iterator(
                split, global_batch_size=global_batch, process_index=p, process_count=processes
            ),
            10**6,
        )
        for p in range(processes)
    ]
    num_batches = -(-n // global_batch)
    assert all(len(batches) == num_batches for batches in per_process)
    seen, mask_total = [], 0.0
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (global_batch // processes, 6, 6, 1)
            assert batch["image"].dtype == np.uint8 and batch["mask"].dtype == np.float32
            real = batch["mask"] == 1.0
            assert np.all(real | (batch["mask"] == 0.0))
            ids = _ids(batch)
            np.testing.assert_array_equal(batch["target"], split.targets[ids])
            seen.extend(ids[real])
            mask_total += batch["mask"].sum()
    assert sorted(seen) == list(range(n))
    assert mask_total == n


def test_training_is_deterministic_given_the_seed():
    split = _split(22)
    a = _take(input_pipeline.train_iterator(split, global_batch_size=4, seed=3), 12)
    b = _take(input_pipeline.train_iterator(split, global_batch_size=4, seed=3), 12)
    _assert_same_batches(a, b)
    c = _take(input_pipeline.train_iterator(split, global_batch_size=4, seed=4), 12)
    assert not all(np.array_equal(_ids(x), _ids(y)) for x, y in zip(a, c, strict=True))


def test_each_epoch_is_a_fresh_permutation_without_the_remainder():
    split = _split(22)
    batches = _take(input_pipeline.train_iterator(split, global_batch_size=4, seed=0), 10)
    epochs = [
        np.concatenate([_ids(b) for b in batches[:5]]),
        np.concatenate([_ids(b) for b in batches[5:]]),
    ]
    for ids in epochs:
        assert len(set(ids)) == 20  # 5 full batches of 4, 2 examples dropped
    assert not np.array_equal(epochs[0], epochs[1])
    for batch in batches:
        assert batch["image"].shape == (4, 6, 6, 1) and batch["target"].shape == (4, 4)
        np.testing.assert_array_equal(batch["target"], split.targets[_ids(batch)])


@pytest.mark.parametrize("sample_labels", [False, True])
@pytest.mark.parametrize("processes", [1, 2])
def test_resume_yields_the_tail_of_a_fresh_iterator(sample_labels, processes):
    split = _split(22, sample_labels=sample_labels, soft=[0.4, 0.3, 0.2, 0.1])
    kwargs = dict(global_batch_size=4, seed=7, process_index=processes - 1, process_count=processes)
    fresh = _take(input_pipeline.train_iterator(split, **kwargs), 13)  # 5 steps per epoch
    for start in (1, 5, 7, 12):
        resumed = _take(
            input_pipeline.train_iterator(split, start_step=start, **kwargs), 13 - start
        )
        _assert_same_batches(resumed, fresh[start:])


def test_resume_far_ahead_does_not_replay_steps():
    split = _split(22, sample_labels=True, soft=[0.4, 0.3, 0.2, 0.1])
    begin = time.perf_counter()
    iterator = input_pipeline.train_iterator(
        split, global_batch_size=4, seed=1, start_step=10**12 + 3
    )
    batch = next(iterator)
    assert time.perf_counter() - begin < 5.0
    assert batch["image"].shape == (4, 6, 6, 1)
    np.testing.assert_array_equal(batch["target"].sum(axis=1), 1.0)


def test_process_slices_are_disjoint_and_form_the_global_batch():
    split = _split(40, sample_labels=True, soft=[0.25, 0.25, 0.25, 0.25])
    whole = _take(input_pipeline.train_iterator(split, global_batch_size=12, seed=2), 6)
    parts = [
        _take(
            input_pipeline.train_iterator(
                split, global_batch_size=12, seed=2, process_index=p, process_count=3
            ),
            6,
        )
        for p in range(3)
    ]
    for step, batch in enumerate(whole):
        ids = [_ids(part[step]) for part in parts]
        assert all(len(i) == 4 for i in ids)
        assert len(set(np.concatenate(ids))) == 12
        np.testing.assert_array_equal(np.concatenate(ids), _ids(batch))
        np.testing.assert_array_equal(
            np.concatenate([part[step]["target"] for part in parts]), batch["target"]
        )


def test_label_drawing_follows_the_target_distribution():
    soft = np.array([0.5, 0.3, 0.2, 0.0])
    split = _split(64, sample_labels=True, soft=soft)
    batches = _take(input_pipeline.train_iterator(split, global_batch_size=64, seed=5), 200)
    targets = np.concatenate([b["target"] for b in batches])  # 12800 draws
    assert targets.dtype == np.float32
    np.testing.assert_array_equal(targets.sum(axis=1), 1.0)
    assert set(np.unique(targets)) == {0.0, 1.0}
    np.testing.assert_allclose(targets.mean(axis=0), soft, atol=0.02)
    assert targets[:, 3].sum() == 0  # a zero-probability class is never drawn
    # The draw for one example changes from epoch to epoch.
    per_epoch = [b["target"][np.argsort(_ids(b))].argmax(axis=1) for b in batches[:2]]
    assert not np.array_equal(*per_epoch)


def test_sample_classes_matches_inverse_cdf():
    targets = np.array([[0.2, 0.0, 0.8], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], np.float32)
    uniforms = np.array([0.19, 0.999999, 0.5])
    np.testing.assert_array_equal(input_pipeline.sample_classes(targets, uniforms), [0, 1, 1])
    np.testing.assert_array_equal(
        input_pipeline.sample_classes(targets, np.array([0.25, 0.0, 0.4999])), [2, 1, 0]
    )


def test_invalid_arguments_are_rejected():
    split = _split(16)
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        input_pipeline.train_iterator(
            split, global_batch_size=8, seed=0, process_index=0, process_count=3
        )
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        input_pipeline.eval_iterator(split, global_batch_size=8, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        input_pipeline.eval_iterator(split, global_batch_size=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        input_pipeline.train_iterator(split, global_batch_size=32, seed=0)


def test_defaults_use_this_process():
    split = _split(10)
    batches = _take(input_pipeline.eval_iterator(split, global_batch_size=4), 10)
    assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 10


# ------------------------------------------------------------------------------------------------
# The plan as indices, for a split kept on the device.


@pytest.mark.parametrize("sample_labels", [False, True])
@pytest.mark.parametrize("processes, start", [(1, 0), (1, 7), (2, 0), (2, 12)])
def test_index_batches_select_exactly_the_host_batches(sample_labels, processes, start):
    """`gather_batch` of each `train_index_iterator` item is the `train_iterator` batch, over epoch
    ends, per process, from a mid-epoch start, with FER+ label drawing."""
    split = _split(22, sample_labels=sample_labels, soft=[0.4, 0.3, 0.2, 0.1])
    kwargs = dict(global_batch_size=4, seed=7, start_step=start, process_index=processes - 1,
                  process_count=processes)
    host = _take(input_pipeline.train_iterator(split, **kwargs), 12)
    indices = _take(input_pipeline.train_index_iterator(split, **kwargs), 12)
    for batch, index in zip(host, indices, strict=True):
        assert set(index) == ({"index", "class"} if sample_labels else {"index"})
        assert all(v.dtype == np.int32 and v.shape == (4 // processes,) for v in index.values())
        np.testing.assert_array_equal(index["index"], _ids(batch))
        gathered = input_pipeline.gather_batch(split.images, split.targets, index)
        _assert_same_batches([gathered], [batch])


def test_gather_batch_on_the_device_matches_numpy():
    import jax
    import jax.numpy as jnp

    split = _split(10, soft=[0.4, 0.3, 0.2, 0.1])
    images, targets = jnp.asarray(split.images), jnp.asarray(split.targets)
    for index in ({"index": np.array([3, 0, 9], np.int32)},
                  {"index": np.array([3, 0, 9], np.int32), "class": np.array([2, 0, 3], np.int32)}):
        on_device = jax.jit(input_pipeline.gather_batch)(images, targets, index)
        _assert_same_batches([jax.device_get(on_device)],
                             [input_pipeline.gather_batch(split.images, split.targets, index)])
    np.testing.assert_array_equal(on_device["target"], np.eye(4, dtype=np.float32)[[2, 0, 3]])


def test_epoch_plan_is_the_documented_order():
    targets = np.tile(np.float32([0.5, 0.5, 0.0]), (23, 1))
    order, classes = input_pipeline.epoch_plan(
        targets, global_batch_size=6, seed=4, epoch=2, sample_labels=True, process_index=1,
        process_count=3, first_step=1)
    permutation = np.random.default_rng([4, 2, 0]).permutation(23)
    np.testing.assert_array_equal(order, permutation[:18].reshape(3, 6)[1:, 2:4])
    uniforms = np.random.default_rng([4, 2, 1]).random(23)
    np.testing.assert_array_equal(classes, (uniforms[order] >= 0.5).astype(np.int32))
    assert order.dtype == classes.dtype == np.int32
    _, none = input_pipeline.epoch_plan(targets, global_batch_size=6, seed=4, epoch=2,
                                        sample_labels=False, process_index=0, process_count=1)
    assert none is None


def test_data_on_device_setting():
    assert [input_pipeline.data_on_device("auto", b) for b in ("cpu", "gpu", "tpu")] == [False, True, True]
    assert input_pipeline.data_on_device("on", "cpu") and not input_pipeline.data_on_device("off", "gpu")
    with pytest.raises(ValueError, match=r"data_on_device='yes': expected one of \['auto', 'on', 'off'\]"):
        input_pipeline.data_on_device("yes", "gpu")


def test_device_memory_problem_compares_with_a_share_of_free_memory():
    gib = 2**30
    stats = [None, {"bytes_limit": 140 * gib, "bytes_in_use": 40 * gib}]  # a CPU is not checked
    assert input_pipeline.device_memory_problem(25 * gib, stats) is None
    problem = input_pipeline.device_memory_problem(25 * gib + 1, stats)
    assert problem == ("the training split needs 25600.0 MiB on each device, more than 25% of local "
                       "device 1's free 102400.0 MiB")
    assert input_pipeline.device_memory_problem(10**15, [None, {}]) is None
