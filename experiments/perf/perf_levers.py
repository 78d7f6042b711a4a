"""Measured effect of train-step performance levers: `python -m experiments.perf.perf_levers`.

Each variant runs `fermsca.bench.benchmark` (paper configuration, batch 128, the full train step, after
compilation) in its own process, so variants share no compiled code or caches; the variants are run in
`--rounds` interleaved rounds and the table gives the median img/s. A variant passes FERNet other
building blocks (`models.from_config(..., conv=, pool=)`), sets glibc's tunable, or asks the benchmark
not to donate buffers; none changes the model's mathematics (tests/test_models.py,
tests/test_pooling.py and tests/test_onednn_conv.py pin that). Cumulative, from a plain Flax/XLA
version to what `fermsca.perf.building_blocks` gives by default:

- `baseline`: `nn.Conv` on XLA, `nn.max_pool` (XLA select-and-scatter gradient), glibc's default malloc;
- `fermsca_pools`: + max-pooling as reshape-max (2x2) and separable shifted maxima (3x3);
- `fermsca_batchnorm`: + `fermsca.perf.batchnorm.BatchNorm` (normalisation as one multiply-add);
- `hugepage_malloc`: + `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (`fermsca.perf.hugepages`);
- `onednn_conv`: + convolutions through oneDNN (`fermsca.perf.onednn_conv`);
- `argmax_pools`: + `fermsca.perf.pooling.max_pool` (each pool records its window's argmax as int8 in
  the forward pass and routes the gradient by it; the pools before it take their gradient from JAX's
  rule for `max`: compare, count ties, divide);
- `fused_stem`: + `fermsca.perf.stem.FusedStem` (the stem's conv + BatchNorm + ReLU + pool in one pass,
  statistics from the patches' Gram matrix). This is the default on x86-64 Linux.

Ablations: `nn_batchnorm` (`argmax_pools` with `nn.BatchNorm`), `xla_default` (the default where
oneDNN cannot run: everything but oneDNN), `xla_plain_stem` (`xla_default` with `models.Stem`),
`no_donation` (`xla_default` without donating the state's
buffers to the step) and `bfloat16` (`xla_default` computing in bfloat16, parameters float32). An
earlier lever measured no gain and was removed: the residual projection fused with the 1x1 branch
into one convolution (experiments/perf/README.md has its numbers).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from fermsca import bench
from fermsca.perf import hugepages

CUMULATIVE = ("baseline", "fermsca_pools", "fermsca_batchnorm", "hugepage_malloc", "onednn_conv",
              "argmax_pools", "fused_stem")
_XLA_DEFAULT = ("fermsca_pools", "fermsca_batchnorm", "hugepage_malloc", "argmax_pools", "fused_stem")
ABLATIONS = {  # variant: (levers on, config changes)
    "nn_batchnorm": (("fermsca_pools", "hugepage_malloc", "onednn_conv", "argmax_pools"), {}),
    "xla_default": (_XLA_DEFAULT, {}),
    "xla_plain_stem": (_XLA_DEFAULT[:-1], {}),
    "no_donation": (_XLA_DEFAULT + ("no_donation",), {}),
    "bfloat16": (_XLA_DEFAULT, {"dtype": "bfloat16"}),
}
VARIANTS = CUMULATIVE + tuple(ABLATIONS)
OUTPUT = "experiments/results/bench/perf_levers.json"


def levers_of(variant: str) -> tuple[tuple[str, ...], dict]:
    if variant in CUMULATIVE:
        return CUMULATIVE[1:CUMULATIVE.index(variant) + 1], {}
    return ABLATIONS[variant]


def separable_max_pool_3x3(x):
    """The `fermsca_pools` 3x3 SAME pool: two separable 3-tap maxima of shifted views."""
    import jax
    import jax.numpy as jnp

    h, w = x.shape[1], x.shape[2]
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    rows = [jax.lax.slice_in_dim(p, i, i + h, axis=1) for i in range(3)]
    rows = jnp.maximum(jnp.maximum(rows[0], rows[1]), rows[2])
    cols = [jax.lax.slice_in_dim(rows, j, j + w, axis=2) for j in range(3)]
    return jnp.maximum(jnp.maximum(cols[0], cols[1]), cols[2])


def reshape_max_pool(x, window_shape, strides=None, padding="VALID"):
    """The `fermsca_pools` lever: `nn.max_pool`'s two FERNet pools as a reshape-max (2x2) and separable
    shifted maxima (3x3), differentiated by JAX's rule for `max`."""
    import flax.linen as nn

    from fermsca.perf import pooling

    if tuple(window_shape) == (2, 2) and tuple(strides) == (2, 2) and padding == "VALID":
        return pooling.reshape_max_2x2(x)
    if tuple(window_shape) == (3, 3) and tuple(strides) == (1, 1) and padding == "SAME":
        return separable_max_pool_3x3(x)
    return nn.max_pool(x, window_shape, strides=strides, padding=padding)


def building_blocks(levers, model_config) -> dict:
    """FERNet's convolution, normalisation, pool and stem under `levers`."""
    import flax.linen as nn

    from fermsca import perf
    from fermsca.perf import batchnorm, pooling, stem

    if "argmax_pools" in levers:
        pool = pooling.max_pool
    elif "fermsca_pools" in levers:
        pool = reshape_max_pool
    else:
        pool = nn.max_pool
    conv = perf.building_blocks(model_config)["conv"] if "onednn_conv" in levers else nn.Conv
    norm = batchnorm.BatchNorm if "fermsca_batchnorm" in levers else nn.BatchNorm
    blocks = {"conv": conv, "norm": norm, "pool": pool}
    if "fused_stem" in levers:
        blocks["stem"] = stem.FusedStem
    return blocks


def _worker(variant: str, seconds: float) -> dict:
    from configs import ferplus
    from fermsca import bench, models

    levers, model_changes = levers_of(variant)
    config = ferplus.get_config()
    config.model.update(model_changes)
    config.model.conv_impl = "onednn" if "onednn_conv" in levers else "xla"
    model = models.from_config(config.model, 8, **building_blocks(levers, config.model))
    record = bench.benchmark(config, 128, seconds, model=model, donate="no_donation" not in levers)
    record["variant"] = variant
    record["levers"] = list(levers)
    return record


NOTES = {
    "baseline": "plain Flax/XLA: nn.Conv, nn.max_pool, nn.BatchNorm, glibc malloc",
    "fermsca_pools": "max-pooling as reshape-max and separable shifted maxima",
    "fermsca_batchnorm": "BatchNorm as x * a + b",
    "hugepage_malloc": "GLIBC_TUNABLES=glibc.malloc.hugetlb=1",
    "onednn_conv": "convolutions through the oneDNN custom call",
    "argmax_pools": "pool gradients routed by a stored int8 argmax",
    "fused_stem": "stem conv + BN + ReLU + pool in one pass (the default)",
    "nn_batchnorm": "argmax_pools with nn.BatchNorm",
    "xla_default": "the default where oneDNN cannot run: fused_stem on XLA convolutions",
    "xla_plain_stem": "xla_default with the plain stem",
    "no_donation": "xla_default, state buffers not donated",
    "bfloat16": "xla_default, bfloat16 compute",
}


def markdown(record: dict) -> str:
    """The lever table: median img/s, step-to-step ratio along the cumulative chain, vs baseline."""
    rows = {row["variant"]: row for row in record["table"]}
    lines = ["| variant | what changes | img/s (median) | vs previous | vs baseline |",
             "|---|---|---:|---:|---:|"]
    previous = None
    base = rows.get("baseline", {}).get("median_images_per_second")
    for variant, row in rows.items():
        v = row["median_images_per_second"]
        if not v:
            lines.append(f"| `{variant}` | failed | | | |")
            continue
        if variant in CUMULATIVE:
            step = f"{v / previous:.2f}x" if previous else "-"
            previous = v
        else:
            step = "(ablation)"
        against_base = f"{v / base:.2f}x" if base else "-"  # a run of some variants, baseline not among them
        lines.append(f"| `{variant}` | {NOTES.get(variant, '')} | {v:.1f} | {step} | {against_base} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--output", default=OUTPUT)
    parser.add_argument("--worker", choices=VARIANTS)
    parser.add_argument("--table_only", action="store_true", help="print the table of --output")
    args = parser.parse_args()
    if args.table_only:
        with open(args.output) as f:
            print(markdown(json.load(f)))
        return
    if args.worker:
        print(json.dumps(_worker(args.worker, args.seconds)))
        return
    runs = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for variant in args.variants:
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if "hugepage_malloc" in levers_of(variant)[0]:
                env["GLIBC_TUNABLES"] = hugepages.TUNABLE
            out = subprocess.run([sys.executable, "-m", "experiments.perf.perf_levers", "--worker", variant,
                                  f"--seconds={args.seconds}"], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{variant}: failed\n{out.stderr[-2000:]}")
                runs[variant].append({"error": out.stderr[-2000:]})
                continue
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {variant}: {runs[variant][-1]['images_per_second']:.1f} img/s")
    table = []
    for variant, records in runs.items():
        ok = [rec["images_per_second"] for rec in records if "images_per_second" in rec]
        table.append({"variant": variant, "median_images_per_second": statistics.median(ok) if ok else None,
                      "per_round": ok})
    base = {row["variant"]: row["median_images_per_second"] for row in table}
    for row in table:
        if row["median_images_per_second"] and base.get("baseline"):
            row["speedup_vs_baseline"] = row["median_images_per_second"] / base["baseline"]
        print(f"{row['variant']:18s} {row['median_images_per_second'] or float('nan'):7.1f} img/s")
    record = {"command": "python -m experiments.perf.perf_levers", "rounds": args.rounds,
              "seconds": args.seconds, "table": table, "records": runs}
    bench.write_json(args.output, record)
    print(markdown(record))


if __name__ == "__main__":
    main()
