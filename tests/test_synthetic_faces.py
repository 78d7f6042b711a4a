"""Synthetic faces: deterministic, balanced, and not linearly separable from raw pixels."""

import numpy as np

from fermsca.datasets import synthetic_faces


def test_generate_is_deterministic():
    a_images, a_labels = synthetic_faces.generate(4, seed=3)
    b_images, b_labels = synthetic_faces.generate(4, seed=3)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    c_images, _ = synthetic_faces.generate(4, seed=4)
    assert not np.array_equal(a_images, c_images)


def test_generate_shapes_and_balance():
    images, labels = synthetic_faces.generate(12, seed=0)
    num_classes = len(synthetic_faces.CLASS_NAMES)
    assert images.shape == (12 * num_classes, 48, 48, 1) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=num_classes).tolist() == [12] * num_classes
    assert labels[:num_classes].tolist() != list(range(num_classes))  # shuffled, not in blocks
    assert images.std() > 20  # not blank


def test_split_sizes_are_class_balanced():
    for size in synthetic_faces.SPLIT_SIZES.values():
        assert size % len(synthetic_faces.CLASS_NAMES) == 0
    assert len(set(synthetic_faces.SPLIT_SEEDS.values())) == len(synthetic_faces.SPLIT_SEEDS)


def _ridge_accuracy(train_x, train_y, test_x, test_y, penalty):
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    test_x = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
    targets = np.eye(len(synthetic_faces.CLASS_NAMES))[train_y]
    gram = train_x.T @ train_x + penalty * np.eye(train_x.shape[1])
    weights = np.linalg.solve(gram, train_x.T @ targets)
    return float(np.mean((test_x @ weights).argmax(1) == test_y))


def test_linear_pixel_classifier_stays_well_below_90_percent():
    per_class = {s: n // len(synthetic_faces.CLASS_NAMES) for s, n in synthetic_faces.SPLIT_SIZES.items()}
    train_x, train_y = synthetic_faces.generate(per_class["train"], synthetic_faces.SPLIT_SEEDS["train"])
    test_x, test_y = synthetic_faces.generate(per_class["test"], synthetic_faces.SPLIT_SEEDS["test"])
    train_x = train_x.reshape(len(train_x), -1).astype(np.float64)
    test_x = test_x.reshape(len(test_x), -1).astype(np.float64)
    # Least squares on standardised pixels, with the best of several ridge penalties chosen on
    # the test split itself (optimistic for the linear model).
    best = max(_ridge_accuracy(train_x, train_y, test_x, test_y, p) for p in (1.0, 1e2, 1e3, 1e4))
    chance = 1 / len(synthetic_faces.CLASS_NAMES)
    assert chance + 0.1 < best < 0.7, best
