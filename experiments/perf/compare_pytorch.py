"""fermsca's train step against the same network in PyTorch eager, timed in one run on one machine.

    pip install torch            # optional; not a dependency of fermsca
    python -m experiments.perf.compare_pytorch [--batch_size 128] [--seconds 10] [--rounds 3]

The PyTorch model mirrors `models.FERNet` layer by layer (same widths, SE, BatchNorm momentum and
epsilon, SAME padding, max-pooling with -inf padding). Before timing, the script checks that both have
the same number of parameters and, with fermsca's weights copied into PyTorch, the same logits in
evaluation and in training mode (batch statistics). Then it times, alternating in rounds and reporting
medians over rounds:

- `fermsca train step`: `train.Trainer.train_step` as training runs it (on-device augmentation,
  cosine loss eq. 4, Adam, the non-finite guard, metrics);
- `fermsca model step`: forward, cosine loss, backward and Adam only, the work PyTorch does;
- the same two with `config.model.conv_impl = "onednn"` where `fermsca.perf.onednn_conv` is available;
- `pytorch eager NCHW` and `pytorch eager channels_last`: forward, cosine loss, backward and
  `torch.optim.Adam` (eps 1e-7) on the same batch, with `torch.set_num_threads(os.cpu_count())`.

FLOPs come from XLA's cost analysis of the compiled model step. Like `python -m fermsca.main`, the
script restarts itself with huge-page malloc (`fermsca.perf.hugepages`), which serves PyTorch too. Writes
experiments/results/bench/compare_pytorch.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fermsca import augment, bench, models, train
from fermsca.perf import hugepages

OUTPUT = "experiments/results/bench/compare_pytorch.json"


def build_torch_model(model: models.FERNet):
    """A torch.nn.Module with FERNet's structure; parameter names follow the Flax variable paths."""
    import torch
    from torch import nn

    momentum, eps = 0.1, 1e-5  # Flax BatchNorm(momentum=0.9, epsilon=1e-5) in PyTorch's convention

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            hidden = max(1, channels // model.se_reduction)
            self.reduce = nn.Linear(channels, hidden)
            self.expand = nn.Linear(hidden, channels)

        def forward(self, u):
            s = u.mean(dim=(2, 3))
            s = torch.sigmoid(self.expand(torch.relu(self.reduce(s))))
            return u * s[:, :, None, None]

    class ConvUnit(nn.Module):
        def __init__(self, c_in: int, features: int, k: int):
            super().__init__()
            self.conv = nn.Conv2d(c_in, features, k, padding=k // 2, bias=not model.use_bn)
            self.bn = nn.BatchNorm2d(features, eps, momentum) if model.use_bn else None
            self.se = SqueezeExcite(features) if model.use_se else None

        def forward(self, x):
            x = self.conv(x)
            if self.bn is not None:
                x = self.bn(x)
            x = torch.relu(x)
            return self.se(x) if self.se is not None else x

    class MultiScaleConv(nn.Module):
        def __init__(self, c_in: int, features: int):
            super().__init__()
            f = features // 4
            self.branch1x1 = ConvUnit(c_in, f, 1)
            self.branch3x3 = ConvUnit(c_in, f, 3)
            self.branch5x5 = ConvUnit(c_in, f, 5)
            self.branch_pool = ConvUnit(c_in, f, 1)
            self.pool = nn.MaxPool2d(3, 1, padding=1)

        def forward(self, x):
            return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x),
                              self.branch_pool(self.pool(x))], dim=1)

    class ResidualBlock(nn.Module):
        def __init__(self, c_in: int, features: int):
            super().__init__()
            self.multiscale = MultiScaleConv(c_in, features)
            self.conv = nn.Conv2d(features, features, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(features, eps, momentum)
            self.se = SqueezeExcite(features)
            self.proj_conv = nn.Conv2d(c_in, features, 1, bias=False) if c_in != features else None
            self.proj_bn = nn.BatchNorm2d(features, eps, momentum) if c_in != features else None

        def forward(self, x):
            y = self.se(self.bn(self.conv(self.multiscale(x))))
            if self.proj_conv is not None:
                x = self.proj_bn(self.proj_conv(x))
            return torch.relu(x + y)

    class TorchFERNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem_conv = nn.Conv2d(1, model.stem_width, 3, padding=1, bias=False)
            self.stem_bn = nn.BatchNorm2d(model.stem_width, eps, momentum)
            self.stem_se = SqueezeExcite(model.stem_width)
            c_in = model.stem_width
            for i, width in enumerate(model.widths):
                setattr(self, f"block{i + 1}", ResidualBlock(c_in, width))
                c_in = width
            self.classifier = nn.Linear(c_in, model.num_classes)

        def forward(self, x):
            x = torch.relu(self.stem_bn(self.stem_conv(x)))
            x = self.stem_se(nn.functional.max_pool2d(x, 2, 2))
            for i in range(len(model.widths)):
                if i > 0:
                    x = nn.functional.max_pool2d(x, 2, 2)
                x = getattr(self, f"block{i + 1}")(x)
            return self.classifier(x.mean(dim=(2, 3)))

    return TorchFERNet()


def copy_weights(variables: dict, torch_model) -> None:
    """Copies Flax params and batch_stats into the PyTorch model (kernels transposed to OIHW / out,in)."""
    import torch

    flat = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            names = [p.key for p in path]
            last = {"kernel": "weight", "scale": "weight", "bias": "bias",
                    "mean": "running_mean", "var": "running_var"}[names[-1]]
            value = np.asarray(leaf)
            if value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            elif value.ndim == 2:
                value = value.T  # (in, out) -> (out, in)
            flat[".".join(names[:-1] + [last])] = torch.from_numpy(np.array(value))
    state = torch_model.state_dict()
    expected = {k for k in state if not k.endswith("num_batches_tracked")}
    if set(flat) != expected:
        raise ValueError(f"parameter names differ: only in Flax {sorted(set(flat) - expected)}, "
                         f"only in PyTorch {sorted(expected - set(flat))}")
    for name, value in flat.items():
        if tuple(state[name].shape) != tuple(value.shape):
            raise ValueError(f"{name}: Flax shape {tuple(value.shape)} vs PyTorch {tuple(state[name].shape)}")
    torch_model.load_state_dict(flat, strict=False)


def torch_cosine_loss(logits, targets):
    """Eq. (4) in PyTorch, as `losses.cosine_similarity_loss` (mean over the batch)."""
    import torch

    probs = torch.softmax(logits, dim=-1)
    p = probs * torch.rsqrt(torch.clamp((probs * probs).sum(-1, keepdim=True), min=1e-12))
    t = targets * torch.rsqrt(torch.clamp((targets * targets).sum(-1, keepdim=True), min=1e-12))
    return -(p * t).sum(-1).mean()


def check_equivalence(model, variables, torch_model, images: np.ndarray) -> dict:
    """Max |logit difference| between fermsca and the PyTorch copy, in eval and train mode."""
    import torch

    x = jnp.asarray(images)
    xt = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    out = {}
    torch_model.eval()
    with torch.no_grad():
        ref = np.asarray(model.apply(variables, x, train=False))
        out["eval_max_abs_diff"] = float(np.abs(torch_model(xt).numpy() - ref).max())
    torch_model.train()
    with torch.no_grad():
        ref, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        out["train_max_abs_diff"] = float(np.abs(torch_model(xt).numpy() - np.asarray(ref)).max())
    out["logit_scale"] = float(np.abs(np.asarray(ref)).max())
    return out


def onednn_available() -> bool:
    from fermsca.perf import onednn_conv

    return onednn_conv.available()


def _stepper(compiled, state, *args):
    """A no-argument function running one step of `compiled` (state donated and carried along)."""
    holder = [jax.tree.map(jnp.copy, state)]

    def step():
        holder[0], _ = compiled(holder[0], *args)
        jax.block_until_ready(holder[0])
    return step


def _time(fn, seconds: float) -> float:
    """Steps per second of `fn()` (which must block until its step is done) over `seconds`."""
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        fn()
        steps += 1
    return steps / (time.perf_counter() - start)


def run(batch_size: int, seconds: float, rounds: int, threads: int) -> dict:
    import torch

    from configs import ferplus

    torch.set_num_threads(threads)
    config = ferplus.get_config()
    config.batch_size = batch_size
    config.model.conv_impl = "xla"  # the first trainer is the XLA row; oneDNN gets its own below
    num_classes = 8
    trainer = train.Trainer(config, num_classes, steps_per_epoch=1000, mesh=train.make_mesh())
    model = trainer.model
    state = trainer.init_state()
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    raw, targets = bench.random_batch(batch_size, num_classes)
    images = np.asarray(augment.preprocess(raw))  # standardised, as the model sees them

    torch_model = build_torch_model(model)
    n_flax = models.count_params(state.params)
    n_torch = sum(p.numel() for p in torch_model.parameters())
    if n_flax != n_torch:
        raise SystemExit(f"parameter counts differ: fermsca {n_flax:,} vs PyTorch {n_torch:,}")
    copy_weights(jax.device_get(variables), torch_model)
    equivalence = check_equivalence(model, variables, torch_model, images[:16])
    print(f"parameters: {n_flax:,} in both; max |logit diff| eval {equivalence['eval_max_abs_diff']:.2e},"
          f" train {equivalence['train_max_abs_diff']:.2e} (logits up to {equivalence['logit_scale']:.2f})")
    if max(equivalence["eval_max_abs_diff"], equivalence["train_max_abs_diff"]) > 1e-3 * max(
            1.0, equivalence["logit_scale"]):
        raise SystemExit("the PyTorch copy does not reproduce fermsca's logits")

    # fermsca: the real train step and the model-only step, for each available convolution path.
    x, y = jnp.asarray(images), jnp.asarray(targets)
    fermsca_steps, model_step_flops = {}, None
    conv_impls = ["xla"] + (["onednn"] if onednn_available() else [])
    for conv_impl in conv_impls:
        config.model.conv_impl = conv_impl
        t = trainer if conv_impl == "xla" else train.Trainer(config, num_classes, steps_per_epoch=1000,
                                                              mesh=train.make_mesh())
        batch = train.global_batch({"image": raw, "target": targets}, t.batch_sharding)
        key = jax.random.fold_in(t.rng, 2)
        compiled_train = t.train_step.lower(state, batch, key).compile()
        compiled_model = jax.jit(functools.partial(bench.model_step, model=t.model, tx=t.tx),
                                 donate_argnums=(0,)).lower(state, x, y).compile()
        if conv_impl == "xla":
            model_step_flops = bench.cost_flops(compiled_model)
        suffix = "" if conv_impl == "xla" else f" ({conv_impl} conv)"
        fermsca_steps[f"fermsca train step{suffix}"] = _stepper(compiled_train, state, batch, key)
        fermsca_steps[f"fermsca model step{suffix}"] = _stepper(compiled_model, state, x, y)

    def torch_stepper(channels_last: bool):
        net = build_torch_model(model)
        copy_weights(jax.device_get(variables), net)
        net.train()
        xt = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            xt = xt.contiguous(memory_format=torch.channels_last)
        yt = torch.from_numpy(targets)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch_cosine_loss(net(xt), yt)
            loss.backward()
            opt.step()
        return step

    variants = {
        **fermsca_steps,
        "pytorch eager NCHW": torch_stepper(False),
        "pytorch eager channels_last": torch_stepper(True),
    }
    for fn in variants.values():  # warm-up
        for _ in range(3):
            fn()
    per_round = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            per_round[name].append(batch_size * _time(fn, seconds))
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {v[-1]:.1f}" for name, v in per_round.items()) + " img/s")
    img_s = {name: statistics.median(v) for name, v in per_round.items()}
    torch_profile = _torch_profile(variants["pytorch eager channels_last"])
    best_torch = max(img_s["pytorch eager NCHW"], img_s["pytorch eager channels_last"])
    matmul = bench.matmul_gflops()
    gflop = model_step_flops / batch_size / 1e9 if model_step_flops else None
    record = {
        "command": "python -m experiments.perf.compare_pytorch",
        "batch_size": batch_size,
        "seconds_per_measurement": seconds,
        "rounds": rounds,
        "images_per_second_median": img_s,
        "images_per_second_per_round": per_round,
        # Each fermsca variant against the faster PyTorch layout, and its FLOP rate (the FLOPs of
        # the XLA model step, the same mathematics on either convolution path).
        "ratio_to_best_pytorch": {name: v / best_torch for name, v in img_s.items()
                                  if name.startswith("fermsca")},
        # The same against PyTorch channels_last timed in the same round (seconds apart), median over
        # rounds: paired, so a drift of the shared machine's speed between rounds cancels.
        "ratio_to_pytorch_channels_last_paired": {
            name: statistics.median(paired_ratios(v, per_round["pytorch eager channels_last"]))
            for name, v in per_round.items() if name.startswith("fermsca")},
        "best_pytorch": "pytorch eager NCHW" if img_s["pytorch eager NCHW"] == best_torch
        else "pytorch eager channels_last",
        "model_step_gflop_per_image": gflop,
        "achieved_gflops": {name: gflop * v for name, v in img_s.items()} if gflop else None,
        "matmul_gflops": matmul,
        "parameters": n_flax,
        "equivalence": equivalence,
        "pytorch_channels_last_profile_ms_per_step": torch_profile,
        "hugepage_malloc": hugepages.active(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                 "cpu": bench.cpu_model(), "avx512": bench.avx512()},
        # Instruction-set caps a run was given (e.g. XLA_FLAGS=--xla_cpu_max_isa=AVX2 and
        # ONEDNN_MAX_CPU_ISA=AVX2, which PyTorch's oneDNN reads too, to time the AVX2 code paths).
        "isa_caps": {name: os.environ.get(name) for name in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA")},
    }
    if gflop:
        record["fraction_of_matmul"] = {name: v / matmul for name, v in record["achieved_gflops"].items()}
    return record


def paired_ratios(rates: list[float], reference: list[float]) -> list[float]:
    """Round-by-round ratios of two rate lists measured in the same interleaved rounds."""
    if len(rates) != len(reference):
        raise ValueError(f"{len(rates)} rounds against {len(reference)}")
    return [a / b for a, b in zip(rates, reference, strict=True)]


def _torch_profile(step, steps: int = 3) -> dict:
    """PyTorch's own breakdown of a step: self CPU ms per step of its 15 costliest operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in rows[:15]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args()
    record = run(args.batch_size, args.seconds, args.rounds, args.threads)
    for name, value in record["images_per_second_median"].items():
        print(f"{name:30s} {value:7.1f} img/s")
    for name, ratio in record["ratio_to_best_pytorch"].items():
        share = record.get("fraction_of_matmul", {}).get(name)
        matmul = (f", {100 * share:.0f}% of large-matmul {record['matmul_gflops']:.0f} GFLOP/s"
                  if share else "")
        print(f"{name:30s} {ratio:.2f}x {record['best_pytorch']}{matmul}")
    for name, ratio in record["ratio_to_pytorch_channels_last_paired"].items():
        print(f"{name:30s} {ratio:.2f}x pytorch eager channels_last, median of per-round ratios")
    bench.write_json(args.output, record)


if __name__ == "__main__":
    hugepages.ensure()
    main()
