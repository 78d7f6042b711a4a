"""Config validation: every field of configs/*.py known, bad values named before any data is built."""

import pytest

from configs import ckplus, default, ferplus, ferplus_plus
from fermsca import config_schema
from fermsca.cli import ConfigError


def test_schema_knows_exactly_the_default_fields():
    assert set(config_schema.flatten(default.get_config())) == set(config_schema.FIELDS)


@pytest.mark.parametrize("module", [default, ferplus, ferplus_plus, ckplus])
def test_shipped_configs_are_valid(module):
    config_schema.validate(module.get_config())


def test_feature_map_sizes():
    assert config_schema.feature_map_sizes(3) == [24, 12, 6]  # Fig. 4: 48 -> 24 -> 12 -> 6
    assert config_schema.feature_map_sizes(6) == [24, 12, 6, 3, 1, 0]


def _with(**fields):
    config = default.get_config()
    with config.unlocked():
        for name, value in fields.items():
            *parents, leaf = name.split("__")
            target = config
            for p in parents:
                target = target[p]
            target[leaf] = value
    return config


@pytest.mark.parametrize("fields, message", [
    ({"keep_checkpoints": 0}, r"config.keep_checkpoints=0: must be >= 1"),
    ({"num_epochs": 0}, r"config.num_epochs=0: must be >= 1"),
    ({"batch_size": -4}, r"config.batch_size=-4: must be >= 1"),
    ({"loss": "cosin"}, r"config.loss='cosin': expected one of \['cosine', 'cross_entropy'\]"),
    ({"dataset__name": "fer"}, r"config.dataset.name='fer'"),
    ({"dataset__label_mode": "vote"}, r"config.dataset.label_mode='vote'"),
    ({"model__widths": (8, 8, 8, 8, 8, 8)},
     r"6 residual blocks pool the 48x48 input down to 0x0 .*use at most 5 blocks"),
    ({"model__widths": ()}, r"config.model.widths=\(\): expected a tuple of at least 1"),
    ({"model__dtype": "float64"}, r"config.model.dtype='float64'"),
    ({"augment__zoom": 1.5}, r"config.augment.zoom=1.5: must be in \[0, 1\)"),
    ({"optimizer__learning_rate": 0.0}, r"config.optimizer.learning_rate=0.0: must be > 0"),
    ({"optimizer__values": (1e-3, 1e-4)}, r"values has 2 entries and boundary_epochs 0"),
    ({"dataset__fold": 10}, r"config.dataset.fold=10: must be below config.dataset.num_folds=10"),
    ({"dataset__protocol": "all"}, r"config.dataset.protocol='all': CK\+ only; synthetic_faces has its "
     r"own splits"),
    ({"dataset__protocol": "leave_one_out"}, r"config.dataset.protocol='leave_one_out': expected one of "
     r"\['kfold', 'random', 'all'\]"),
    ({"optimiser": 3}, r"unknown config field\(s\): config.optimiser"),
    ({"label_smoothing": 1.0}, r"config.label_smoothing=1.0: must be in \[0, 1\)"),
    ({"class_weighting": -1.0}, r"config.class_weighting=-1.0: must be >= 0"),
    ({"ema_decay": 1.0}, r"config.ema_decay=1.0: must be in \[0, 1\)"),
    ({"steps_per_dispatch": 0}, r"config.steps_per_dispatch=0: must be >= 1"),
    ({"data_on_device": "true"}, r"config.data_on_device='true': expected one of \['auto', 'on', 'off'\]"),
    ({"optimizer__schedule": "warmup_cosine", "optimizer__warmup_epochs": 8, "num_epochs": 8},
     r"config.optimizer.warmup_epochs=8: must be below config.num_epochs=8"),
])
def test_bad_values_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        config_schema.validate(_with(**fields))


def test_missing_field_is_an_error():
    config = default.get_config()
    with config.unlocked():
        del config.augment["flip"]
    with pytest.raises(ConfigError, match=r"missing: config.augment.flip"):
        config_schema.validate(config)


def test_batch_must_divide_devices_and_processes():
    config = default.get_config()
    config_schema.validate(config, device_count=8)
    config.batch_size = 30
    with pytest.raises(ConfigError, match=r"config.batch_size=30 must be divisible by the number of "
                                          r"devices \(4\) and processes \(1\); e.g. use 32"):
        config_schema.validate(config, device_count=4)
    config.batch_size, config.eval_batch_size = 33, 100
    with pytest.raises(ConfigError, match=r"config.eval_batch_size=100 .* processes \(3\); e.g. use 99"):
        config_schema.validate(config, process_count=3)


def test_data_on_device_choices_are_the_input_pipelines():
    from fermsca import input_pipeline

    assert config_schema.DATA_ON_DEVICE == input_pipeline.DATA_ON_DEVICE
