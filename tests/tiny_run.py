"""A tiny FERNet with random weights, saved as a training run's checkpoint: the shared subject of the
evaluation, export and prediction tests (no training, no `model.init` compilation)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from fermsca import checkpoint

CLASS_NAMES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
               "contempt"]


def tiny_config():
    """The default config with widths 8/16/16."""
    config = default.get_config()
    config.model.stem_width = 8
    config.model.widths = (8, 16, 16)
    return config


def random_variables(model: nn.Module, seed: int, spread: float = 1.5) -> dict:
    """Weights whose outputs are far from uniform (`spread` scales them), BatchNorm variances near 1."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 1)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if "var" in jax.tree_util.keystr(path):
            return (1.0 + 0.2 * rng.random(leaf.shape)).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
        return (rng.normal(size=leaf.shape) * spread / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def save_run_checkpoint(workdir: str, config, variables: dict, step: int = 0,
                        class_names=CLASS_NAMES) -> str:
    """A checkpoint in a training run's layout (TrainState fields, less the optimiser state), saved
    as the run's latest and best; returns `workdir`."""
    state = {"step": np.int32(step), "params": variables["params"],
             "batch_stats": variables["batch_stats"]}
    meta = {"config": config.to_json(), "class_names": list(class_names), "epoch": 1, "history": []}
    ckpts = checkpoint.RunCheckpoints(workdir, asynchronous=False)
    ckpts.save(step, state, meta, val_accuracy=0.5)
    ckpts.close()
    return workdir
