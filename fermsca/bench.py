"""Train-step throughput benchmark: `python -m fermsca.bench [--batch_size 128] [--seconds 30]`.

Times the compiled train step of a config (`--config`, default configs/ferplus.py: the paper's model,
optimiser, loss and augmentation) on random data already on device, after compilation and warm-up, and prints
`N img/s` with the achieved GFLOP/s (XLA's cost analysis of the step) beside the machine's large-matmul
GFLOP/s for context. Writes a JSON record with `--output`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fermsca import cli, hostenv, perf
from fermsca.perf import hugepages


def matmul_gflops(n: int = 2048, seconds: float = 3.0, dtype=jnp.float32) -> float:
    """Sustained GFLOP/s of an n x n matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(a, b).block_until_ready()
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def random_batch(batch_size: int, num_classes: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [B, 48, 48, 1] of uniform noise and one-hot float32 targets [B, K]: benchmark input."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, 48, 48, 1), dtype=np.uint8)
    targets = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, batch_size)]
    return images, targets


def cpu_model() -> str:
    """The CPU: its model name, family, model and vector ISA (`hostenv.cpu`)."""
    return hostenv.cpu()["name"]


def avx512() -> bool | None:
    """Whether /proc/cpuinfo lists AVX-512 (avx512f); None where it cannot be read."""
    if not os.path.exists("/proc/cpuinfo"):
        return None
    return "avx512f" in hostenv.cpu()["isa"]


def write_json(path: str, record: dict) -> None:
    """Writes a benchmark record, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def cost_flops(compiled) -> float | None:
    """FLOPs of a compiled computation by XLA's cost analysis (None where it gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def model_step(state, images: jax.Array, targets: jax.Array, *, model, tx):
    """Forward, cosine loss (eq. 4), backward and optimiser update on preprocessed images: the
    train step without augmentation, metrics or the non-finite guard (for comparisons and profiles)."""
    import optax

    from fermsca import losses

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
        return jnp.mean(losses.cosine_similarity_loss(logits, targets)), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state), loss


def benchmark(config, batch_size: int, seconds: float, warmup: int = 3, *, model=None,
              donate: bool = True) -> dict:
    """Images/s of `train.Trainer`'s compiled train step for `config` at `batch_size`, timed for
    `seconds` after compilation and `warmup` steps. `model` replaces the config's FERNet (e.g. other
    building blocks) and `donate=False` keeps the state's buffers: the speed levers' ablations."""
    from fermsca import config_schema, perf, train

    config.batch_size = batch_size
    num_classes = 8
    mesh = train.make_mesh()
    config_schema.check_batch_size("batch_size", batch_size, jax.device_count(), jax.process_count())
    trainer = train.Trainer(config, num_classes, steps_per_epoch=1000, mesh=mesh, model=model,
                            donate=donate)
    state = trainer.init_state()
    images, targets = random_batch(batch_size, num_classes)
    batch = train.global_batch({"image": images, "target": targets}, trainer.batch_sharding)
    key = jax.random.fold_in(trainer.rng, 2)

    t0 = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch, key).compile()
    compile_seconds = time.perf_counter() - t0
    step_flops = cost_flops(compiled)
    conv_impl = perf.resolve_conv_impl(config.model.conv_impl, perf.conv_dtype(config.model))
    if conv_impl != "xla":
        # XLA counts no FLOPs inside custom calls: count the same step (same mathematics) on XLA's path.
        reference = config.copy_and_resolve_references()
        reference.model.conv_impl = "xla"
        ref_trainer = train.Trainer(reference, num_classes, steps_per_epoch=1000, mesh=mesh)
        step_flops = cost_flops(ref_trainer.train_step.lower(state, batch, key).compile())
    for _ in range(warmup):
        state, _ = compiled(state, batch, key)
    jax.block_until_ready(state)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        state, _ = compiled(state, batch, key)
        steps += 1
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    img_per_s = steps * batch_size / elapsed
    return {
        "batch_size": batch_size,
        "steps": steps,
        "seconds": elapsed,
        "images_per_second": img_per_s,
        "step_ms": 1000 * elapsed / steps,
        "compile_seconds": compile_seconds,
        "step_gflop": step_flops / 1e9 if step_flops else None,
        "achieved_gflops": step_flops * steps / elapsed / 1e9 if step_flops else None,
        "dtype": config.model.dtype,
        "conv_dtype": perf.conv_dtype(config.model),
        "conv_impl": conv_impl,
        "hugepage_malloc": hugepages.active(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "cpu": cpu_model()},
        "jax": jax.__version__,
    }


def load_config(path: str):
    """The `get_config()` of a config file (e.g. configs/ferplus.py), as `--config` of fermsca.main."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such config file (run from the repository root, "
                                "or give the path of a config file)")
    cli.config_package_on_path(path)
    spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ferplus.py",
                        help="config file whose model, optimiser, loss and augmentation are timed")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--conv_dtype", default="float32", choices=perf.CONV_DTYPES,
                        help="config.model.conv_dtype: bfloat16 convolution operands in a float32 model")
    parser.add_argument("--conv_impl", default="xla", choices=["xla", "onednn"])
    parser.add_argument("--no_matmul", action="store_true", help="skip the matmul reference")
    parser.add_argument("--output", help="write the record as JSON here")
    parser.add_argument("--compilation_cache", default=hostenv.default_compilation_cache(),
                        help="JAX's persistent compilation cache directory ('off' disables it)")
    args = parser.parse_args()
    hostenv.enable_compilation_cache(args.compilation_cache)

    config = load_config(args.config)
    config.model.dtype = args.dtype
    config.model.conv_impl = args.conv_impl
    config.model.conv_dtype = args.conv_dtype
    record = benchmark(config, args.batch_size, args.seconds)
    if not args.no_matmul:
        record["matmul_gflops"] = matmul_gflops()
        if record["achieved_gflops"]:
            record["fraction_of_matmul"] = record["achieved_gflops"] / record["matmul_gflops"]
    print(f"{record['images_per_second']:.1f} img/s  (batch {args.batch_size}, "
          f"{record['step_ms']:.1f} ms/step, {record['device_count']} x "
          f"{record['device_kind']}, {args.dtype}, conv {args.conv_impl} in {record['conv_dtype']}, "
          "huge-page malloc "
          f"{'on' if record['hugepage_malloc'] else 'off'})")
    if record["achieved_gflops"]:
        line = f"train step {record['step_gflop']:.2f} GFLOP -> {record['achieved_gflops']:.1f} GFLOP/s"
        if "matmul_gflops" in record:
            line += (f" ({100 * record['fraction_of_matmul']:.0f}% of large-matmul "
                     f"{record['matmul_gflops']:.1f} GFLOP/s)")
        print(line)
    if args.output:
        write_json(args.output, record)


if __name__ == "__main__":
    hugepages.ensure()
    sys.exit(cli.run(main))
