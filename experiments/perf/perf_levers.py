"""Measured effect of train-step performance levers: `python -m experiments.perf.perf_levers`.

Each variant runs `fermsca.bench.benchmark` (paper configuration, batch 128, the full train step, after
compilation) in its own process, so variants share no compiled code or caches; the variants are run in
`--rounds` interleaved rounds and the table gives the median img/s. None changes the model's
mathematics (results agree to float32 rounding; tests/test_models.py and tests/test_onednn_conv.py pin
that). Cumulative, from a plain Flax/XLA version to everything on:

- `baseline`: `nn.max_pool` (XLA select-and-scatter gradient), `nn.BatchNorm`, the residual
  projection as its own convolution, glibc's default malloc;
- `fermsca_pools`: + `models.max_pool_2x2` (reshape + max) and `models.max_pool_3x3_same` (separable
  shifted maxima);
- `fused_projection`: + the projection and the 1x1 branch as one convolution (measured slower, so
  off in the default config: `config.model.fuse_projection`);
- `fermsca_batchnorm`: + `models.BatchNorm` (normalisation as one multiply-add per element);
- `hugepage_malloc`: + `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (`fermsca.hostenv`);
- `onednn_conv`: + convolutions through oneDNN (`config.model.conv_impl = "onednn"`, optional);
- `argmax_pools`: + `fermsca.pooling` (each pool records its window's argmax as int8 in the forward
  pass and routes the gradient by it; the reshape-max and separable pools before it take their
  gradient from JAX's rule for `max`: compare, count ties, divide).

Ablations: `onednn_unfused` (everything but the fused projection: the fastest configuration),
`xla_default` (what `python -m fermsca.main` runs by default: everything but the fused projection and
oneDNN), `no_donation` (`xla_default` without donating the state's buffers to the step) and `bfloat16`
(`xla_default` computing in bfloat16, parameters float32).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from fermsca import bench, hostenv

CUMULATIVE = ("baseline", "fermsca_pools", "fused_projection", "fermsca_batchnorm", "hugepage_malloc",
              "onednn_conv", "argmax_pools")
_DEFAULT = ("fermsca_pools", "fermsca_batchnorm", "hugepage_malloc", "argmax_pools")
ABLATIONS = {  # variant: (levers on, config changes)
    "onednn_unfused": (_DEFAULT + ("onednn_conv",), {}),
    "xla_default": (_DEFAULT, {}),
    "no_donation": (_DEFAULT + ("no_donation",), {}),
    "bfloat16": (_DEFAULT, {"dtype": "bfloat16"}),
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


def _worker(variant: str, seconds: float) -> dict:
    import flax.linen as nn
    import jax

    from configs import ferplus
    from fermsca import bench, models, pooling

    levers, model_changes = levers_of(variant)
    config = ferplus.get_config()
    config.model.update(model_changes)
    config.model.fuse_projection = "fused_projection" in levers
    if "fermsca_pools" not in levers:
        models.max_pool_2x2 = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
        models.max_pool_3x3_same = lambda x: nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")
    elif "argmax_pools" not in levers:
        models.max_pool_2x2 = pooling.reshape_max_2x2
        models.max_pool_3x3_same = separable_max_pool_3x3
    if "fermsca_batchnorm" not in levers:
        models.BatchNorm = nn.BatchNorm
    config.model.conv_impl = "onednn" if "onednn_conv" in levers else "xla"
    if "no_donation" in levers:
        jit = jax.jit

        def jit_without_donation(fn, **kwargs):
            kwargs.pop("donate_argnums", None)
            return jit(fn, **kwargs)
        jax.jit = jit_without_donation  # this worker process only: no step donates its inputs
    record = bench.benchmark(config, 128, seconds)
    record["variant"] = variant
    record["levers"] = list(levers)
    return record


NOTES = {
    "baseline": "plain Flax/XLA: nn.max_pool, nn.BatchNorm, glibc malloc",
    "fermsca_pools": "max-pooling as reshape-max and separable shifted maxima",
    "fused_projection": "1x1 branch + projection as one convolution",
    "fermsca_batchnorm": "BatchNorm as x * a + b",
    "hugepage_malloc": "GLIBC_TUNABLES=glibc.malloc.hugetlb=1",
    "onednn_conv": "convolutions through the oneDNN custom call",
    "argmax_pools": "pool gradients routed by a stored int8 argmax",
    "onednn_unfused": "argmax_pools without the fused projection",
    "xla_default": "the default: onednn_unfused with XLA convolutions",
    "no_donation": "xla_default, state buffers not donated",
    "bfloat16": "xla_default, bfloat16 compute",
}


def markdown(record: dict) -> str:
    """The lever table: median img/s, step-to-step ratio along the cumulative chain, vs baseline."""
    rows = {row["variant"]: row for row in record["table"]}
    lines = ["| variant | what changes | img/s (median) | vs previous | vs baseline |",
             "|---|---|---:|---:|---:|"]
    previous = None
    for variant, row in rows.items():
        v = row["median_images_per_second"]
        if variant in CUMULATIVE:
            step = f"{v / previous:.2f}x" if previous else "-"
            previous = v
        else:
            step = "(ablation)"
        base = rows.get("baseline", {}).get("median_images_per_second")
        lines.append(f"| `{variant}` | {NOTES.get(variant, '')} | {v:.1f} | {step} | "
                     f"{v / base:.2f}x |" if v and base else f"| `{variant}` | failed | | | |")
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
                env["GLIBC_TUNABLES"] = hostenv.TUNABLE
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
