"""Default: the built-in `synthetic_faces` set, a few minutes on 2 CPU cores.

Every switch the paper studies is a field here; override any of them from the command line, e.g.
`python -m fermsca.main --config configs/default.py --config.loss=cross_entropy --config.model.use_se=False`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "synthetic_faces"  # synthetic_faces | ferplus | ckplus
    c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir (None: default)
    c.dataset.manual_dir = ml_collections.config_dict.placeholder(str)  # raw files (FER+, CK+)
    c.dataset.label_mode = "majority"  # FER+ train: majority | crossentropy | probability | multi_target
    c.dataset.builder_config = "ckplus48"  # CK+: official | ckplus48
    c.dataset.frames_per_sequence = 3  # CK+ official: last K frames of each labelled sequence
    c.dataset.allow_center_crop = False  # CK+ official: centre crop where no face is found
    c.dataset.protocol = "kfold"  # CK+: kfold (by subject) | random (by image) | all (train on all)
    c.dataset.num_folds = 10
    c.dataset.fold = 0
    c.dataset.split_seed = 0
    c.dataset.rebuild = False  # rebuild the stored TFDS set from manual_dir (e.g. after relabelling)
    c.dataset.train_subset = 0  # > 0: train on the first N training examples only (quick runs)
    # A file written by `python -m fermsca.datasets.packed`: read instead of building the dataset
    # (no TFDS or TensorFlow needed); its content fields must match the ones above.
    c.dataset.packed_file = ml_collections.config_dict.placeholder(str)

    # FERNet (Fig. 4). The paper gives no widths: these are ours (~1.25M parameters).
    c.model = ml_collections.ConfigDict()
    c.model.stem_width = 64
    c.model.widths = (64, 128, 256)
    c.model.use_bn = True  # Table 3: BatchNorm in the multiscale module
    c.model.use_se = True  # Table 3: SE in the multiscale module
    c.model.se_reduction = 8
    c.model.dropout_rate = 0.0
    c.model.dtype = "float32"  # float32 | bfloat16 (compute; parameters stay float32)
    # Beyond the paper: bfloat16 rounds the convolutions' operands to bfloat16 (accumulated and
    # returned in float32; every other layer stays float32): mixed precision where a CPU has bfloat16
    # convolutions (oneDNN on AVX512_BF16 / AMX) or a GPU has bfloat16 tensor cores.
    c.model.conv_dtype = "float32"  # float32 | bfloat16
    # Speed only (fermsca.perf; same parameters and mathematics): auto | xla | onednn. auto is oneDNN on
    # an x86-64 Linux CPU when its extension builds (g++, compiled once), XLA otherwise.
    c.model.conv_impl = "auto"

    c.loss = "cosine"  # cosine (eq. 4) | cross_entropy
    c.label_smoothing = 0.0  # beyond the paper: train on (1 - a) * target + a / K
    # Beyond the paper: weight each example's loss by (N / (K n_class)) ** p; 0 off, 1 inverse frequency.
    c.class_weighting = 0.0
    # Beyond the paper: > 0 keeps an exponential moving average of the weights and BatchNorm statistics
    # (ema <- d_t * ema + (1 - d_t) * new after step t, d_t = min(d, (1 + t) / (10 + t))), which
    # evaluation, checkpoint selection and inference use; 0 off. E.g. 0.999.
    c.ema_decay = 0.0

    c.optimizer = ml_collections.ConfigDict()
    # table1 (Table 1, scaled to num_epochs) | constant (Table 2) | warmup_cosine (beyond the paper)
    c.optimizer.schedule = "table1"
    c.optimizer.learning_rate = 1e-3  # schedule=constant; the peak of warmup_cosine
    c.optimizer.warmup_epochs = 0  # schedule=warmup_cosine: linear warm-up, then cosine decay to 0
    c.optimizer.boundary_epochs = ()  # empty: Table 1 boundaries scaled to num_epochs
    c.optimizer.values = ()  # empty: Table 1 values
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-7  # Keras' Adam default (the paper's framework)
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 0.0

    # Augmentation (section 3.1): shift 5%, rotation 10 degrees, zoom 0.3; per-image standardisation.
    c.augment = ml_collections.ConfigDict()
    c.augment.shift = 0.05
    c.augment.rotation = 10.0
    c.augment.zoom = 0.3
    c.augment.isotropic_zoom = True
    c.augment.flip = False
    c.augment.mixup_alpha = 0.0  # beyond the paper: > 0 mixes examples (mixup, Beta(a, a) weights)

    c.num_epochs = 8
    c.batch_size = 64  # global, over all devices and processes
    c.eval_batch_size = 256
    # Speed only (same steps, batches and results): K train steps per compiled call (a lax.scan), so
    # the host dispatches once per K steps; worth it where a step is short (a GPU). 1: one at a time.
    c.steps_per_dispatch = 1
    # Speed only (same batches and results): auto | on | off. on keeps the training split on the devices
    # and sends each step only its indices (gathered in the step); auto is on for a GPU or TPU and off
    # on a CPU, where "device" memory is host memory and tf.data already gathers the next batches
    # while a step runs. auto falls back to host batches where the split would not fit; on fails.
    c.data_on_device = "auto"

    c.log_every_steps = 20
    c.checkpoint_every_epochs = 1
    c.checkpoint_every_steps = 0  # > 0: also checkpoint every N steps (long epochs)
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    c.max_steps = 0  # > 0: stop after this many steps (tests, smoke runs)
    c.evaluate_test = True  # evaluate best and last checkpoints on the test split at the end
    return c
