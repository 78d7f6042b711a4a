"""Runs a few train steps on fixed data with however many devices JAX sees; saves the params.

Used by tests/test_train.py in a subprocess with XLA_FLAGS set to simulate CPU devices:
    python tests/_train_steps.py OUT.npz [STEPS] [STEPS_PER_DISPATCH] [ON_DEVICE]
With STEPS_PER_DISPATCH K > 1 the steps run K at a time (`Trainer.train_chunk`), the rest one by one.
With ON_DEVICE 1 the batches are placed on the devices as one split (`Trainer.put_train_split`) and
each step gets their indices, gathered in the step.
"""

import sys
import types

import jax
import numpy as np

from configs import default
from fermsca import train


def tiny_config():
    c = default.get_config()
    c.model.stem_width = 8
    c.model.widths = (8, 16, 16)
    c.batch_size = 16
    c.num_epochs = 1
    return c


def main(out: str, steps: int = 3, steps_per_dispatch: int = 1, on_device: int = 0) -> None:
    config = tiny_config()
    trainer = train.Trainer(config, num_classes=8, steps_per_epoch=100, mesh=train.make_mesh())
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(steps):
        images = rng.integers(0, 256, (config.batch_size, 48, 48, 1), dtype=np.uint8)
        labels = rng.integers(0, 8, config.batch_size)
        targets = np.eye(8, dtype=np.float32)[labels]
        batches.append({"image": images, "target": targets})
    data = None
    if on_device:
        split = types.SimpleNamespace(images=np.concatenate([b["image"] for b in batches]),
                                      targets=np.concatenate([b["target"] for b in batches]))
        data = trainer.put_train_split(split)
        batches = [{"index": np.arange(i * config.batch_size, (i + 1) * config.batch_size, dtype=np.int32)}
                   for i in range(steps)]
    done = 0
    while done < steps:
        if steps - done >= steps_per_dispatch > 1:
            state, _ = trainer.train_chunk(state, batches[done:done + steps_per_dispatch], data)
            done += steps_per_dispatch
        else:
            state, _ = trainer.train(state, batches[done], data)
            done += 1
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(
        {"params": state.params, "batch_stats": state.batch_stats}))[0]
    np.savez(out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat},
             __devices=np.array(jax.device_count()))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
