"""Measured effect of train-step performance levers: `python -m experiments.perf_levers`.

Each lever runs `fermsca.bench.benchmark` (paper configuration, batch 128, after compilation) in
its own process, so the variants do not share compiled code or caches. Levers so far:

- `flax_max_pool`: the Flax/XLA max-pooling (`nn.max_pool`, select-and-scatter gradient);
- `fermsca_pools`: `models.max_pool_2x2` (reshape + max) and `models.max_pool_3x3_same` (separable
  shifted maxima), the project's default.
"""

import argparse
import json
import os
import subprocess
import sys

VARIANTS = ("flax_max_pool", "fermsca_pools")


def _worker(variant: str, seconds: float) -> dict:
    import flax.linen as nn

    from configs import ferplus
    from fermsca import bench, models

    if variant == "flax_max_pool":
        models.max_pool_2x2 = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
        models.max_pool_3x3_same = lambda x: nn.max_pool(x, (3, 3), strides=(1, 1), padding="SAME")
    record = bench.benchmark(ferplus.get_config(), 128, seconds)
    record["variant"] = variant
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--output", default="experiments/results/bench/perf_levers.json")
    parser.add_argument("--worker", choices=VARIANTS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.seconds)))
        return
    records = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "experiments.perf_levers", "--worker", variant,
                              f"--seconds={args.seconds}"], capture_output=True, text=True,
                             check=True)
        records.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {records[-1]['images_per_second']:.1f} img/s")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"command": "python -m experiments.perf_levers", "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
