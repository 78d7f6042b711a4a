"""Where the train step's time goes: `python -m experiments.perf.profile_step [--batch_size 128]`.

Traces a few compiled train steps of the paper configuration with `jax.profiler` (one event per
executed XLA thunk), joins every event to its HLO instruction in the compiled module, and sums the time
two ways:

- by kind of work: convolution forward / input gradient / weight gradient, layout transposes,
  elementwise fusions, reductions, dense layers, other;
- by place in the network: the Flax module path from the instruction's metadata (stem, block1..3 and
  their multiscale branches, the optimiser update, augmentation).

`--step model` profiles forward + cosine loss + backward + Adam (what `experiments.perf.compare_pytorch`
compares with PyTorch); `--step train` the full `train.Trainer.train_step` (with augmentation).
`--conv_impl` profiles another convolution path. Writes experiments/results/bench/profile_<step>.json
and prints the two tables in markdown.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp

from fermsca import bench
from fermsca.perf import hugepages

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_WINDOW = re.compile(r"window=\{size=(\d+)x(\d+)")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """(instructions, computations): name -> line, and computation name -> its body lines."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = computations.setdefault(m.group(1), [])
            continue
        m = _INSTRUCTION.match(line)
        if m:
            instructions[m.group(1)] = m.group(2)
            if current is not None:
                current.append(m.group(2))
    return instructions, computations


def _body(line: str, computations: dict) -> list[str]:
    m = _CALLS.search(line)
    return computations.get(m.group(1), []) if m else [line]


def classify(line: str, computations: dict) -> str:
    """Kind of work of one HLO instruction (the main operation of a fusion)."""
    body = _body(line, computations)
    op_name = (_OP_NAME.search(line) or _OP_NAME.search(" ".join(body)) or [None, ""])[1]
    backward = "transpose(" in op_name
    convs = [b for b in body if " convolution(" in b]
    if "onednn_conv_fwd" in line:
        return "conv forward"
    if "onednn_conv_bwd_data" in line:
        return "conv input gradient"
    if "onednn_conv_bwd_weights" in line:
        return "conv weight gradient"
    if convs:
        window = _WINDOW.search(convs[0])
        if not backward:
            return "conv forward"
        if window and int(window.group(1)) > 5:  # the window spans the image: a weight gradient
            return "conv weight gradient"
        return "conv input gradient"
    if any(" dot(" in b for b in body):
        return "dense (matmul)"
    if any(" transpose(" in b or " copy(" in b for b in body) and not any(
            " reduce(" in b for b in body):
        return "layout transpose/copy"
    if any(" reduce(" in b or " reduce-window(" in b for b in body):
        return "reductions (BN, SE, pooling means)"
    if any(" select-and-scatter(" in b or " scatter(" in b for b in body):
        return "scatter"
    return "elementwise fusions"


def place(line: str, computations: dict) -> str:
    """Network location of an instruction from its metadata op_name (e.g. 'block2/multiscale')."""
    body = _body(line, computations)
    m = _OP_NAME.search(line) or _OP_NAME.search(" ".join(body))
    if not m:
        return "(no metadata: layout copies)"
    path = m.group(1)
    if "FERNet" not in path:
        if "augment" in path or "affine" in path or "map_coordinates" in path:
            return "augmentation"
        return "optimiser, loss and step bookkeeping"
    parts = [p for p in path.split("/") if not p.startswith(("jit(", "jvp(", "transpose(", "vmap("))]
    modules = [p for p in parts[:-1] if re.match(r"^(stem_\w+|block\d|multiscale|branch\w+|conv|bn|se|"
                                                  r"proj_\w+|classifier)$", p)]
    if not modules:
        return "FERNet (pooling, activations)"
    if modules[0].startswith("block") and len(modules) > 1:
        if modules[1] == "multiscale":
            return "/".join(modules[:3])
        return f"{modules[0]}/{modules[1]}"
    return modules[0]


def trace_events(trace_dir: str) -> list[dict]:
    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[0]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def build_step(step: str, batch_size: int, conv_impl: str | None, dtype: str = "float32"):
    """(compiled step, state, args) for the paper configuration."""
    from configs import ferplus
    from fermsca import augment, train

    config = ferplus.get_config()
    config.batch_size = batch_size
    config.model.conv_impl = conv_impl or "xla"
    config.model.dtype = dtype
    trainer = train.Trainer(config, 8, steps_per_epoch=1000, mesh=train.make_mesh())
    state = trainer.init_state()
    raw, targets = bench.random_batch(batch_size, 8)
    if step == "train":
        args = (train.global_batch({"image": raw, "target": targets}, trainer.batch_sharding),
                jax.random.fold_in(trainer.rng, 2))
        fn = trainer.train_step
    else:
        args = (augment.preprocess(raw), jnp.asarray(targets))
        fn = jax.jit(functools.partial(bench.model_step, model=trainer.model, tx=trainer.tx),
                     donate_argnums=(0,))
    return fn.lower(state, *args).compile(), state, args


def profile(step: str, batch_size: int, steps: int, conv_impl: str | None = None,
            dtype: str = "float32") -> dict:
    compiled, state, args = build_step(step, batch_size, conv_impl, dtype)
    instructions, computations = parse_hlo(compiled.as_text())
    for _ in range(3):
        state, _ = compiled(state, *args)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(steps):
                state, _ = compiled(state, *args)
            jax.block_until_ready(state)
            wall = time.perf_counter() - start
        events = trace_events(trace_dir)
    by_kind, by_place, by_place_kind, by_op = (collections.Counter() for _ in range(4))
    unmatched = 0.0
    for e in events:
        line = instructions.get(e["name"])
        if line is None:
            if not e["name"].startswith(("ThunkExecutor", "$")):
                unmatched += e.get("dur", 0)
            continue
        ms = e.get("dur", 0) / 1e3 / steps
        kind, where = classify(line, computations), place(line, computations)
        by_kind[kind] += ms
        by_place[where] += ms
        by_place_kind[f"{where} | {kind}"] += ms
        by_op[e["name"]] += ms
    total = sum(by_kind.values())
    top = [{"instruction": name, "ms_per_step": ms, "kind": classify(instructions[name], computations),
            "place": place(instructions[name], computations),
            "shape": instructions[name].split(" ", 1)[0]} for name, ms in by_op.most_common(15)]
    return {
        "command": f"python -m experiments.perf.profile_step --step {step} --batch_size {batch_size}"
                   + (f" --conv_impl {conv_impl}" if conv_impl else "")
                   + (f" --dtype {dtype}" if dtype != "float32" else ""),
        "step": step,
        "batch_size": batch_size,
        "conv_impl": conv_impl or "xla",
        "dtype": dtype,
        "steps_traced": steps,
        "wall_ms_per_step": 1000 * wall / steps,
        "thunk_ms_per_step": total,
        "unmatched_ms_per_step": unmatched / 1e3 / steps,
        "by_kind_ms": dict(by_kind.most_common()),
        "by_place_ms": dict(by_place.most_common()),
        "by_place_and_kind_ms": dict(by_place_kind.most_common()),
        "top_instructions": top,
        "jax": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "cpu": bench.cpu_model(),
        # Instruction-set caps the run was given (e.g. the AVX2 code paths, as in compare_pytorch).
        "isa_caps": {name: os.environ.get(name) for name in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA")},
    }


def markdown(record: dict) -> str:
    total = record["thunk_ms_per_step"]
    lines = [f"Step `{record['step']}`, batch {record['batch_size']}, conv {record['conv_impl']}, "
             f"{record.get('dtype', 'float32')}: "
             f"{record['wall_ms_per_step']:.0f} ms wall per step, {total:.0f} ms in XLA thunks "
             "(thunks can overlap on the two cores).", "",
             "| kind of work | ms / step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {100 * v / total:.0f}% |" for k, v in record["by_kind_ms"].items()]
    lines += ["", "| place in the network | ms / step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {100 * v / total:.0f}% |" for k, v in record["by_place_ms"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", choices=("model", "train"), default="model")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--conv_impl", default=None, help="config.model.conv_impl (default: the config's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="config.model.dtype (compute precision)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    record = profile(args.step, args.batch_size, args.steps, args.conv_impl, args.dtype)
    print(markdown(record))
    output = args.output or (f"experiments/results/bench/profile_{args.step}"
                             + (f"_{args.conv_impl}" if args.conv_impl else "")
                             + (f"_{args.dtype}" if args.dtype != "float32" else "") + ".json")
    bench.write_json(output, record)


if __name__ == "__main__":
    hugepages.ensure()
    main()
