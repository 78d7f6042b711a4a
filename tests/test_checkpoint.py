"""Checkpoint helpers: shape checks, path resolution, fallback over a corrupt step, release copies."""

import json
import logging
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from fermsca import checkpoint


def _state(width=4):
    return {"params": {"w": jnp.arange(width * 3, dtype=jnp.float32).reshape(width, 3)},
            "batch_stats": {"m": jnp.ones((3,), jnp.float32)},
            "opt_state": {"mu": jnp.zeros((width, 3), jnp.float32)}}


def _save(workdir, steps, width=4):
    ckpts = checkpoint.RunCheckpoints(str(workdir), keep=3, asynchronous=False)
    for i, step in enumerate(steps):
        state = {**_state(width), "params": {"w": _state(width)["params"]["w"] + i}}
        ckpts.save(step, state, {"config": "{}", "class_names": ["a", "b", "c"], "history": []},
                   val_accuracy=0.5 + 0.1 * (i % 2))
    ckpts.wait()
    return ckpts


def test_shape_mismatches_names_every_difference():
    problems = checkpoint.shape_mismatches(
        {"a": np.zeros((2, 3)), "b": np.zeros(4)}, {"a": np.zeros((2, 5)), "c": np.zeros(1)})
    assert problems == ["a: checkpoint has (2, 5), config expects (2, 3)",
                        "b: expected by the config, missing from the checkpoint",
                        "c: in the checkpoint, unknown to the config"]


def test_restore_latest_best_and_find(tmp_path):
    ckpts = _save(tmp_path, [10, 20, 30])
    state, meta = ckpts.restore_latest(_state())
    assert float(state["params"]["w"][0, 0]) == 2.0 and meta["class_names"] == ["a", "b", "c"]
    best_state, _ = ckpts.restore_best(_state())
    assert float(best_state["params"]["w"][0, 0]) == 1.0  # step 20 had the best accuracy
    assert checkpoint.find_checkpoint(str(tmp_path)) == (str(tmp_path / "best"), 20)
    latest = str(tmp_path / "checkpoints")
    assert checkpoint.find_checkpoint(latest) == (latest, 30)
    assert checkpoint.find_checkpoint(os.path.join(latest, "10")) == (latest, 10)
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.find_checkpoint(str(tmp_path / "nope"))
    ckpts.close()


def test_mismatched_shapes_are_refused(tmp_path):
    ckpts = _save(tmp_path, [5])
    with pytest.raises(checkpoint.CheckpointError, match=r"params/w: checkpoint has \(4, 3\), "
                       r"config expects \(6, 3\)"):
        ckpts.restore_latest(_state(width=6))
    ckpts.close()


def test_corrupt_latest_is_set_aside(tmp_path, caplog):
    _save(tmp_path, [10, 20]).close()
    state_dir = tmp_path / "checkpoints" / "20" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00")
    ckpts = checkpoint.RunCheckpoints(str(tmp_path), keep=3, asynchronous=False)
    with caplog.at_level(logging.WARNING):
        state, _ = ckpts.restore_latest(_state())
    assert float(state["params"]["w"][0, 0]) == 0.0  # step 10
    assert "corrupt or partial" in caplog.text
    assert (tmp_path / "corrupt_checkpoints" / "20").is_dir()
    assert ckpts.latest.all_steps() == [10]
    ckpts.close()


def test_release_keeps_inference_variables_only(tmp_path):
    _save(tmp_path / "run", [7]).close()
    out = checkpoint.write_release(str(tmp_path / "run"), str(tmp_path / "release"))
    assert out == str(tmp_path / "release" / "7")
    variables, meta = checkpoint.load_checkpoint(str(tmp_path / "release"))
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(variables["params"]["w"], np.asarray(_state()["params"]["w"]))
    assert meta["step"] == 7 and meta["class_names"] == ["a", "b", "c"]
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        checkpoint.write_release(str(tmp_path / "run"), str(tmp_path / "release"))


def test_release_can_set_the_convolutions_precision(tmp_path):
    ckpts = checkpoint.RunCheckpoints(str(tmp_path / "run"), keep=3, asynchronous=False)
    config = {"seed": 0, "model": {"widths": [4], "conv_dtype": "bfloat16"}}
    ckpts.save(5, _state(), {"config": json.dumps(config), "class_names": ["a"], "history": []},
               val_accuracy=0.5)
    ckpts.wait()
    ckpts.close()
    checkpoint.write_release(str(tmp_path / "run"), str(tmp_path / "f32"), conv_dtype="float32")
    _, meta = checkpoint.load_checkpoint(str(tmp_path / "f32"))
    assert json.loads(meta["config"]) == {"seed": 0, "model": {"widths": [4], "conv_dtype": "float32"}}
    assert meta["trained_conv_dtype"] == "bfloat16"
    checkpoint.write_release(str(tmp_path / "run"), str(tmp_path / "kept"))
    _, meta = checkpoint.load_checkpoint(str(tmp_path / "kept"))
    assert json.loads(meta["config"]) == config and "trained_conv_dtype" not in meta
    with pytest.raises(checkpoint.CheckpointError, match="conv_dtype must be one of"):
        checkpoint.write_release(str(tmp_path / "run"), str(tmp_path / "bad"), conv_dtype="float16")


def test_load_checkpoint_reads_a_run_and_a_release_without_warnings(tmp_path, caplog):
    """A run's best/<step>/state has no step metadata of its own (the manager keeps it one level
    up); reading it must not log Orbax's missing-metadata warning."""
    _save(tmp_path / "run", [3, 5]).close()
    checkpoint.write_release(str(tmp_path / "run"), str(tmp_path / "release"))
    with caplog.at_level(logging.WARNING):
        for path in (tmp_path / "run", tmp_path / "release"):
            variables, _ = checkpoint.load_checkpoint(str(path))
            np.testing.assert_array_equal(variables["params"]["w"],
                                          np.asarray(_state()["params"]["w"]) + 1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def _corrupt(state_dir):
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00")


def test_every_latest_corrupt_falls_back_to_best_then_to_nothing(tmp_path):
    _save(tmp_path, [10, 20]).close()  # best: step 20
    for step in (10, 20):
        _corrupt(tmp_path / "checkpoints" / str(step) / "state")
    ckpts = checkpoint.RunCheckpoints(str(tmp_path), keep=3, asynchronous=False)
    state, meta = ckpts.restore_latest(_state())
    assert float(state["params"]["w"][0, 0]) == 1.0 and ckpts.set_aside == [20, 10]
    ckpts.close()

    _corrupt(tmp_path / "best" / "20" / "state")
    ckpts = checkpoint.RunCheckpoints(str(tmp_path), keep=3, asynchronous=False)
    assert ckpts.restore_latest(_state()) is None
    assert ckpts.set_aside == [20] and ckpts.aside_dir == str(tmp_path / "corrupt_checkpoints")
    assert sorted(os.listdir(ckpts.aside_dir)) == ["10", "20", "best_20"]
    assert ckpts.best.all_steps() == [] and ckpts.latest.all_steps() == []
    ckpts.close()
    ckpts.close()  # twice is fine


def test_corrupt_checkpoint_error_is_short(tmp_path):
    _save(tmp_path / "run", [4]).close()
    _corrupt(tmp_path / "run" / "best" / "4" / "state")
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_checkpoint(str(tmp_path / "run"))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'run' / 'best' / '4'}/state: corrupt or unreadable")
    assert "\n" not in message and len(message) < 400 + len(str(tmp_path)), message


def test_brief():
    assert checkpoint.brief(ValueError("one\ntwo")) == "ValueError: one"
    assert checkpoint.brief(OSError("x" * 300)) == "OSError: " + "x" * 200 + "..."
    assert checkpoint.brief(KeyError()) == "KeyError"


def test_a_failed_restore_quiets_only_its_own_aftermath(monkeypatch, caplog):
    """Orbax raises a corrupt checkpoint's first read error; the reads still in flight then fail
    in the background (unraisable errors, asyncio's 'never retrieved' log). After the first failure
    those are dropped, and only those."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "filters", [])
    checkpoint._quiet_read_aftermath()
    checkpoint._quiet_read_aftermath()  # idempotent: one hook, one filter
    assert len(asyncio_log.filters) == 1
    for error in (RuntimeError("Event loop is closed"),
                  Exception("Encountered error while reading array index: (slice(0, 8, 1),)"),
                  ValueError("a different problem")):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error))
    assert seen == ["a different problem"]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio_log.error("Task exception was never retrieved\nfuture: <Task finished ...>")
        asyncio_log.error("Unclosed client session")
    assert [r.getMessage() for r in caplog.records] == ["Unclosed client session"]
