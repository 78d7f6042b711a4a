"""Orbax checkpoints of a training run: the last K for resumption, and the best by validation accuracy.

Layout in the workdir:

    checkpoints/<step>/{state,meta}   the last `keep` checkpoints (state pytree + JSON metadata)
    best/<step>/{state,meta}          the single best checkpoint by validation accuracy

`meta` holds the run's config, class names, epoch and training history, so a checkpoint is enough to
rebuild the model (see `load_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fermsca import perf

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, corrupt, or incompatible with the config."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"params/block1/conv/kernel": shape, ...}; dataclass fields and dict keys read alike."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in flat}


def shape_mismatches(expected: Any, found: Any) -> list[str]:
    """Human-readable differences between two pytrees' structures and leaf shapes."""
    want, have = _shapes(expected), _shapes(found)
    problems = [f"{k}: checkpoint has {have[k]}, config expects {want[k]}"
                for k in sorted(want.keys() & have.keys()) if want[k] != have[k]]
    problems += [f"{k}: expected by the config, missing from the checkpoint"
                 for k in sorted(want.keys() - have.keys())]
    problems += [f"{k}: in the checkpoint, unknown to the config"
                 for k in sorted(have.keys() - want.keys())]
    return problems


def brief(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut at `limit` characters: the storage library's errors
    carry its whole (tens of lines) storage spec, which says nothing more to a user."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > limit:
        first = first[:limit] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# What Orbax's concurrent array reads leave behind when one of them fails: it raises the first
# error, closes its event loop, and the reads still in flight then fail again in the background.
_READ_AFTERMATH = ("Encountered error while reading array index", "Event loop is closed",
                   "Task exception was never retrieved")


class _ReadAftermathFilter(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith(_READ_AFTERMATH)


def _quiet_read_aftermath() -> None:
    """Drops the tracebacks of a failed restore's other reads (asyncio's "Task exception was never
    retrieved", TensorStore callbacks on the closed loop): hundreds of lines around the one-line
    error that names the checkpoint. Installed once, after the first failed read; other errors
    and warnings pass."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _ReadAftermathFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_ReadAftermathFilter())
    previous = sys.unraisablehook
    if getattr(previous, "_fermsca_read_aftermath", False):
        return

    def hook(unraisable):
        if not str(unraisable.exc_value).startswith(_READ_AFTERMATH):
            previous(unraisable)

    hook._fermsca_read_aftermath = True
    sys.unraisablehook = hook


def _manager(directory: str, keep: int, best: bool, asynchronous: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        best_fn=(lambda m: m["accuracy"]) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
        enable_async_checkpointing=asynchronous,
        create=True,
        # Both managers save the same step; distinct barrier names keep multi-process saves apart.
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=os.path.basename(os.path.normpath(directory))),
    )
    # Handlers named up front, so a fresh process can read item metadata before any save/restore.
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    found = manager.item_metadata(step)["state"]
    if found is None:
        raise CheckpointError(f"{manager.directory}/{step}: no state metadata")
    problems = shape_mismatches(abstract_state, found)
    if problems:
        raise CheckpointError(
            f"checkpoint {manager.directory}/{step} does not match the config:\n  "
            + "\n  ".join(problems)
        )
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])


class RunCheckpoints:
    """The last `keep` checkpoints and the best one of a run, in `workdir`."""

    def __init__(self, workdir: str, keep: int = 2, asynchronous: bool = True):
        self.workdir = workdir
        self.aside_dir = os.path.join(workdir, "corrupt_checkpoints")
        self.set_aside: list[int] = []  # steps found corrupt and moved to `aside_dir`
        self._closed = False
        self.latest = _manager(os.path.join(workdir, LATEST_DIR), keep, False, asynchronous)
        self.best = _manager(os.path.join(workdir, BEST_DIR), 1, True, asynchronous)

    def save(self, step: int, state: Any, meta: Mapping[str, Any],
             val_accuracy: float | None = None) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(dict(meta)))
        self.latest.save(step, args=args, force=True)
        if val_accuracy is not None:
            self.best.save(step, args=args, metrics={"accuracy": float(val_accuracy)}, force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """Newest usable checkpoint, falling back to older ones (with a warning) when corrupt, and
        to the best checkpoint when every one of the last `keep` is. Unreadable ones are moved to
        `aside_dir` (their steps listed in `set_aside`). None when nothing usable is left.

        A checkpoint whose shapes do not match `abstract_state` is refused with a CheckpointError naming
        every mismatch: resuming a run under a different config is a mistake, not a fallback case.
        """
        for manager in (self.latest, self.best):
            for step in sorted(manager.all_steps(), reverse=True):
                try:
                    restored = _restore(manager, step, abstract_state)
                except CheckpointError as e:
                    if "does not match the config" in str(e):
                        raise
                    problem = str(e)
                except Exception as e:  # noqa: BLE001 - any read failure means a corrupt checkpoint
                    _quiet_read_aftermath()
                    problem = brief(e)
                else:
                    if manager is self.best:
                        logging.warning("resuming from the best checkpoint, step %d: none of the "
                                        "latest could be read", step)
                    # Best checkpoints past the resume point belong to steps that will be trained
                    # again; the run saves them anew.
                    for later in [s for s in self.best.all_steps() if s > step]:
                        self.best.delete(later)
                    return restored
                self._set_aside(manager, step, problem)
        return None

    def _set_aside(self, manager: ocp.CheckpointManager, step: int, problem: str) -> None:
        """Moves an unreadable checkpoint to <workdir>/corrupt_checkpoints/ (kept for inspection) so
        the run can resume from an older one and save this step again."""
        aside = self.aside_dir
        self.set_aside.append(step)
        kind = os.path.basename(os.path.normpath(str(manager.directory)))
        target = os.path.join(aside, f"{step}" if manager is self.latest else f"{kind}_{step}")
        suffix, base = 0, target
        while os.path.exists(target):
            suffix += 1
            target = f"{base}.{suffix}"
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            os.replace(os.path.join(str(manager.directory), str(step)), target)
        logging.warning("checkpoint %s/%d is corrupt or partial (%s); moved it to %s and trying an "
                        "older one", manager.directory, step, problem, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{kind}_{step}")
        manager.reload()

    def restore_best(self, abstract_state: Any) -> tuple[Any, dict] | None:
        step = self.best.best_step()
        return None if step is None else _restore(self.best, step, abstract_state)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and stops the writer threads; safe to call twice."""
        if not self._closed:
            self._closed = True
            self.latest.close()
            self.best.close()


def find_checkpoint(path: str) -> tuple[str, int]:
    """Resolves a user-given path to (manager directory, step).

    Accepts a workdir (uses its best checkpoint, else its latest), a `checkpoints/` or `best/` folder
    (its newest step), or one step folder.
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    candidates = [os.path.join(path, BEST_DIR), os.path.join(path, LATEST_DIR), path]
    for directory in candidates:
        steps = _steps_in(directory)
        if steps:
            return directory, max(steps)
    parent, name = os.path.split(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return parent, int(name)
    raise CheckpointError(f"{path}: no checkpoint found (expected a workdir, a {LATEST_DIR}/ or "
                          f"{BEST_DIR}/ folder, or one numbered step folder)")


def _steps_in(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return [int(d) for d in os.listdir(directory)
            if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state"))]


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """Reads a checkpoint for inference: ({'params', 'batch_stats'} as NumPy, meta dict); of a run
    with `config.ema_decay` > 0, its exponential moving average (the state's `ema`).

    `meta["config"]` is the run's config as a JSON string and `meta["class_names"]` the label names.
    """
    directory, step = find_checkpoint(path)
    step_dir = os.path.join(directory, str(step))
    try:
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir}/meta: unreadable checkpoint metadata ({e})") from e
    state_dir = os.path.join(step_dir, "state")
    try:
        # The item's own metadata: a run's step folder keeps Orbax's step metadata one level up
        # (<step>/_CHECKPOINT_METADATA, written by the CheckpointManager), so asking the
        # Checkpointer for it here would only log that <step>/state has none.
        found = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)).tree
        with ocp.StandardCheckpointer() as ckptr:
            # Restore onto this process's first device, whatever topology saved it.
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), found)
            state = ckptr.restore(state_dir, target)
    except Exception as e:  # noqa: BLE001
        _quiet_read_aftermath()
        raise CheckpointError(f"{step_dir}/state: corrupt or unreadable checkpoint "
                              f"({brief(e)})") from e
    # A run trained with config.ema_decay > 0 keeps the weight average that it evaluated with.
    weights = state["ema"] if state.get("ema") else state
    variables = {"params": weights["params"], "batch_stats": weights.get("batch_stats", {})}
    return jax.tree.map(np.asarray, variables), meta


def write_release(path: str, output: str, conv_dtype: str | None = None) -> str:
    """Copies a checkpoint's inference variables (params, batch_stats) and metadata, without the
    optimiser state, to `output/<step>/` in the layout `load_checkpoint` reads. Returns that folder.

    `conv_dtype` ("float32" or "bfloat16") sets the precision the released model's convolutions
    compute in (its config's `model.conv_dtype`), e.g. float32 for weights trained with bfloat16
    operands; the metadata keeps the run's as `trained_conv_dtype`. None keeps the run's."""
    variables, meta = load_checkpoint(path)
    if conv_dtype is not None:
        if conv_dtype not in perf.CONV_DTYPES:
            raise CheckpointError(f"conv_dtype must be one of {perf.CONV_DTYPES}, got {conv_dtype!r}")
        config = json.loads(meta["config"])
        model = config.setdefault("model", {})
        meta["trained_conv_dtype"] = model.get("conv_dtype", "float32")
        model["conv_dtype"] = conv_dtype
        meta["config"] = json.dumps(config)
    _, step = find_checkpoint(path)
    step_dir = os.path.abspath(os.path.join(output, str(step)))
    if os.path.exists(step_dir):
        raise CheckpointError(f"{step_dir} already exists")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(step_dir, "state"), variables)
    os.makedirs(os.path.join(step_dir, "meta"), exist_ok=True)
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        json.dump({**meta, "released_from": os.path.abspath(path), "step": step}, f, indent=1)
    return step_dir


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Write a checkpoint's inference weights (no optimiser state) for release.")
    parser.add_argument("--checkpoint", required=True, help="workdir, checkpoints/ or best/ folder")
    parser.add_argument("--output", required=True)
    parser.add_argument("--conv_dtype", choices=perf.CONV_DTYPES, default=None,
                        help="precision of the released model's convolutions (default: the run's)")
    args = parser.parse_args()
    print(write_release(args.checkpoint, args.output, args.conv_dtype))


if __name__ == "__main__":
    main()
