"""Checks a training config before anything is built: every field known, every value in range.

The defaults live in `configs/default.py`; this module only knows which fields exist and which
values they accept (`FIELDS`; a test pins it to the default config's fields). `validate` raises a
`ConfigError` naming the field, before any dataset is built or any step compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from fermsca import losses, perf, schedules
from fermsca.cli import ConfigError
from fermsca.datasets import labels

IMAGE_SIZE = 48
DATASETS = ("synthetic_faces", "ferplus", "ckplus")
DTYPES = ("float32", "bfloat16", "float16")
DATA_ON_DEVICE = ("auto", "on", "off")  # input_pipeline.DATA_ON_DEVICE (not imported: TensorFlow)


def _one_of(*choices) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"expected one of {list(choices)}"


def _at_least(low, integer=True) -> Callable[[Any], str | None]:
    def check(v):
        if integer and (isinstance(v, bool) or not isinstance(v, int)):
            return "expected an integer"
        if not integer and (isinstance(v, bool) or not isinstance(v, int | float)):
            return "expected a number"
        return None if v >= low else f"must be >= {low}"

    return check


def _fraction(v) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "expected a number"
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _positive_number(v) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "expected a number"
    return None if v > 0 else "must be > 0"


def _bool(v) -> str | None:
    return None if isinstance(v, bool) else "expected True or False"


def _text_or_none(v) -> str | None:
    return None if v is None or isinstance(v, str) else "expected a path or None"


def _int_tuple(min_length: int) -> Callable[[Any], str | None]:
    def check(v):
        if not isinstance(v, tuple | list) or len(v) < min_length:
            return f"expected a tuple of at least {min_length} integer(s)"
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v):
            return "expected positive integers"
        return None

    return check


def _numbers(v) -> str | None:
    if not isinstance(v, tuple | list):
        return "expected a tuple of numbers"
    return None if all(isinstance(x, int | float) and not isinstance(x, bool) for x in v) else (
        "expected numbers")


FIELDS: dict[str, Callable[[Any], str | None]] = {
    "seed": _at_least(0),
    "dataset.name": _one_of(*DATASETS),
    "dataset.data_dir": _text_or_none,
    "dataset.manual_dir": _text_or_none,
    "dataset.label_mode": _one_of(*labels.LABEL_MODES),
    "dataset.builder_config": _one_of("official", "ckplus48"),
    "dataset.frames_per_sequence": _at_least(1),
    "dataset.allow_center_crop": _bool,
    "dataset.protocol": _one_of("kfold", "random", "all"),
    "dataset.num_folds": _at_least(3),
    "dataset.fold": _at_least(0),
    "dataset.split_seed": _at_least(0),
    "dataset.rebuild": _bool,
    "dataset.train_subset": _at_least(0),
    "dataset.packed_file": _text_or_none,
    "model.stem_width": _at_least(1),
    "model.widths": _int_tuple(1),
    "model.use_bn": _bool,
    "model.use_se": _bool,
    "model.se_reduction": _at_least(1),
    "model.dropout_rate": _fraction,
    "model.dtype": _one_of(*DTYPES),
    "model.conv_dtype": _one_of(*perf.CONV_DTYPES),
    "model.conv_impl": _one_of(*perf.CONV_IMPLS),
    "loss": _one_of(*losses.LOSSES),
    "label_smoothing": _fraction,
    "class_weighting": _at_least(0, integer=False),
    "ema_decay": _fraction,
    "optimizer.schedule": _one_of(*schedules.SCHEDULES),
    "optimizer.learning_rate": _positive_number,
    "optimizer.warmup_epochs": _at_least(0),
    "optimizer.boundary_epochs": _numbers,
    "optimizer.values": _numbers,
    "optimizer.b1": _fraction,
    "optimizer.b2": _fraction,
    "optimizer.eps": _positive_number,
    "optimizer.weight_decay": _at_least(0, integer=False),
    "optimizer.grad_clip_norm": _at_least(0, integer=False),
    "augment.shift": _fraction,
    "augment.rotation": _at_least(0, integer=False),
    "augment.zoom": _fraction,
    "augment.isotropic_zoom": _bool,
    "augment.flip": _bool,
    "augment.mixup_alpha": _at_least(0, integer=False),
    "num_epochs": _at_least(1),
    "batch_size": _at_least(1),
    "eval_batch_size": _at_least(1),
    "steps_per_dispatch": _at_least(1),
    "data_on_device": _one_of(*DATA_ON_DEVICE),
    "log_every_steps": _at_least(1),
    "checkpoint_every_epochs": _at_least(1),
    "checkpoint_every_steps": _at_least(0),
    "keep_checkpoints": _at_least(1),
    "async_checkpoints": _bool,
    "max_steps": _at_least(0),
    "evaluate_test": _bool,
}


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{"model.widths": (64, 128, 256), ...}: every leaf field by its dotted name."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def feature_map_sizes(num_blocks: int, image_size: int = IMAGE_SIZE) -> list[int]:
    """Side of the feature map entering each residual block (Fig. 4: a 2x2 max-pool after the stem
    and between blocks; 'valid' pools floor odd sides)."""
    sizes, side = [], image_size
    for _ in range(num_blocks):
        side //= 2
        sizes.append(side)
    return sizes


def validate(config: ml_collections.ConfigDict, device_count: int = 1, process_count: int = 1) -> None:
    """Raises ConfigError for an unknown or missing field, a value out of range, a model whose
    feature map collapses, or a batch size that does not divide the devices and processes."""
    fields = flatten(config)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join('config.' + f for f in unknown)} "
                          "(see configs/default.py for every field)")
    missing = sorted(set(FIELDS) - set(fields))
    if missing:
        raise ConfigError(f"config field(s) missing: {', '.join('config.' + f for f in missing)}; "
                          "build configs on configs/default.py's get_config()")
    for name, check in FIELDS.items():
        problem = check(fields[name])
        if problem:
            raise ConfigError(f"config.{name}={fields[name]!r}: {problem}")
    if config.dataset.protocol != "kfold" and config.dataset.name != "ckplus":
        raise ConfigError(f"config.dataset.protocol={config.dataset.protocol!r}: CK+ only; "
                          f"{config.dataset.name} has its own splits")
    if config.dataset.fold >= config.dataset.num_folds:
        raise ConfigError(f"config.dataset.fold={config.dataset.fold}: must be below "
                          f"config.dataset.num_folds={config.dataset.num_folds}")
    sizes = feature_map_sizes(len(config.model.widths))
    if sizes[-1] < 1:
        raise ConfigError(
            f"config.model.widths={tuple(config.model.widths)}: {len(sizes)} residual blocks pool "
            f"the {IMAGE_SIZE}x{IMAGE_SIZE} input down to {sizes[-1]}x{sizes[-1]} (sides "
            f"{sizes}); use at most {sum(s >= 1 for s in sizes)} blocks")
    if config.optimizer.schedule == "warmup_cosine" and config.optimizer.warmup_epochs >= config.num_epochs:
        raise ConfigError(f"config.optimizer.warmup_epochs={config.optimizer.warmup_epochs}: must be "
                          f"below config.num_epochs={config.num_epochs}")
    values, boundaries = fields["optimizer.values"], fields["optimizer.boundary_epochs"]
    if config.optimizer.schedule == "table1" and (values or boundaries):
        if len(values) != len(boundaries) + 1:
            raise ConfigError(
                f"config.optimizer.values has {len(values)} entries and boundary_epochs "
                f"{len(boundaries)}: give one more value than boundaries")
        if list(boundaries) != sorted(boundaries):
            raise ConfigError(f"config.optimizer.boundary_epochs={tuple(boundaries)}: must increase")
    for name in ("batch_size", "eval_batch_size"):
        check_batch_size(name, config[name], device_count, process_count)


def check_batch_size(name: str, size: int, device_count: int, process_count: int) -> None:
    """ConfigError unless the global batch `config.<name>` divides over the devices and processes."""
    if size % device_count or size % process_count:
        good = max(device_count, process_count) * max(1, round(size / max(device_count, process_count)))
        raise ConfigError(
            f"config.{name}={size} must be divisible by the number of devices "
            f"({device_count}) and processes ({process_count}); e.g. use {good}")
