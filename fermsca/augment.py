"""Training augmentation and input standardisation as pure, jittable functions on device batches.

The paper augments with Keras' `ImageDataGenerator`: random shifts of up to 5% of the height and
width, rotations of up to 10 degrees, zoom range 0.3, and per-image standardisation. Here the
shift, rotation and zoom of each image are composed into one affine matrix and each image is
resampled once with `jax.scipy.ndimage.map_coordinates` (bilinear, edge pixels repeated outside the
image, like Keras' default `fill_mode="nearest"`).

Geometry, in pixel coordinates (row, col) with the origin at the centre of the top-left pixel and
c = ((H - 1) / 2, (W - 1) / 2) the image centre, a point p of the input moves to

    p' = c + R(angle) @ diag(scale) @ (p - c) + shift

  * shift = (dy, dx) in pixels: positive dy moves the content down, positive dx to the right;
  * angle in degrees: positive turns the content counter-clockwise as the image is displayed
    (row 0 at the top);
  * scale = (sy, sx), the magnification along rows and columns: scale 1.3 moves a point 1.3 times
    further from the centre.

Random zoom follows Keras: a factor z is drawn uniformly from [1 - zoom, 1 + zoom] and used as
the sampling step, so the magnification is 1 / z (zoom 0.3 gives magnifications 0.77 to 1.43).
Keras draws separate factors for the two axes; `isotropic_zoom=True` (the default) draws one.

Beyond the paper, `mixup` (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018)
blends each image and its target with another example of the batch.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

Array = jax.Array


def standardize(images: Array) -> Array:
    """Per-image standardisation, as `tf.image.per_image_standardization`.

    (x - mean) / max(std, 1 / sqrt(H * W * C)), with mean and std over each image.

    Args:
      images: [B, H, W, C], any real dtype.

    Returns:
      float32 [B, H, W, C].
    """
    x = jnp.asarray(images).astype(jnp.float32)
    num_pixels = x.shape[1] * x.shape[2] * x.shape[3]
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) / jnp.maximum(std, 1.0 / jnp.sqrt(float(num_pixels)))


def preprocess(images: Array) -> Array:
    """Evaluation and inference preprocessing: uint8 [B, H, W, C] -> standardised float32."""
    return standardize(images)


def affine_matrix(shift: Array, angle_deg: Array, scale: Array, size: tuple[int, int]) -> Array:
    """The sampling matrix of one shift-rotate-zoom transform (see the module docstring).

    Args:
      shift: (dy, dx) in pixels, shape [2].
      angle_deg: rotation in degrees, counter-clockwise as displayed; a scalar.
      scale: magnification, a scalar or (sy, sx).
      size: (H, W) of the image.

    Returns:
      float32 [3, 3] homogeneous matrix M mapping an output pixel (row, col, 1) to the input
      position it is read from, the inverse of the transform of the module docstring.
    """
    shift = jnp.asarray(shift, jnp.float32)
    theta = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (2,))
    centre = (jnp.asarray(size, jnp.float32) - 1.0) / 2.0
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # Forward rotation in (row, col) with rows pointing down: [[cos, -sin], [sin, cos]].
    # Its inverse is the transpose; diag(1 / scale) then undoes the magnification.
    inv_rotation = jnp.array([[cos, sin], [-sin, cos]])
    linear = inv_rotation / scale[:, None]  # [2, 2]
    offset = centre - linear @ (centre + shift)
    top = jnp.concatenate([linear, offset[:, None]], axis=1)  # [2, 3]
    return jnp.concatenate([top, jnp.array([[0.0, 0.0, 1.0]])], axis=0)


@jax.jit
def apply_affine(images: Array, matrices: Array) -> Array:
    """Resamples each image with its sampling matrix from `affine_matrix`.

    Args:
      images: [B, H, W, C].
      matrices: [B, 3, 3], output (row, col, 1) -> input position.

    Returns:
      float32 [B, H, W, C], bilinear, edge pixels repeated outside the image.
    """
    images = jnp.asarray(images).astype(jnp.float32)
    height, width = images.shape[1], images.shape[2]
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )

    def warp(image: Array, m: Array) -> Array:  # [H, W, C], [3, 3]
        # Elementwise, so the positions are full float32 on every backend (no reduced-precision
        # matmul); each channel is resampled in 2-D (4 taps a pixel).
        src_rows = m[0, 0] * rows + m[0, 1] * cols + m[0, 2]
        src_cols = m[1, 0] * rows + m[1, 1] * cols + m[1, 2]

        def channel(plane: Array) -> Array:
            return ndimage.map_coordinates(plane, [src_rows, src_cols], order=1, mode="nearest")

        return jax.vmap(channel, in_axes=2, out_axes=2)(image)

    return jax.vmap(warp)(images, matrices)


def sample_affine_params(
    rng: Array,
    num: int,
    size: tuple[int, int],
    *,
    max_shift: float = 0.05,
    max_rotation: float = 10.0,
    zoom_range: float = 0.3,
    isotropic_zoom: bool = True,
) -> tuple[Array, Array, Array]:
    """Draws Keras-style random transform parameters for `num` images.

    Returns:
      shift [num, 2] in pixels, uniform in +-max_shift * (H, W); angle [num] in degrees, uniform
      in +-max_rotation; scale [num, 2] magnifications 1 / z with z uniform in
      [1 - zoom_range, 1 + zoom_range], equal on both axes when `isotropic_zoom`.
    """
    if not 0.0 <= zoom_range < 1.0:
        raise ValueError(f"zoom_range must be in [0, 1), got {zoom_range}")
    k_shift, k_angle, k_zoom = jax.random.split(rng, 3)
    extent = max_shift * jnp.asarray(size, jnp.float32)
    shift = jax.random.uniform(k_shift, (num, 2), minval=-1.0, maxval=1.0) * extent
    angle = jax.random.uniform(k_angle, (num,), minval=-max_rotation, maxval=max_rotation)
    zoom_shape = (num, 1) if isotropic_zoom else (num, 2)
    z = jax.random.uniform(k_zoom, zoom_shape, minval=1.0 - zoom_range, maxval=1.0 + zoom_range)
    scale = jnp.broadcast_to(1.0 / z, (num, 2))
    return shift, angle, scale


def random_affine(
    rng: Array,
    images: Array,
    *,
    max_shift: float = 0.05,
    max_rotation: float = 10.0,
    zoom_range: float = 0.3,
    isotropic_zoom: bool = True,
) -> Array:
    """Random shift, rotation and zoom of each image, resampled once. [B, H, W, C] -> float32."""
    size = (images.shape[1], images.shape[2])
    shift, angle, scale = sample_affine_params(
        rng,
        images.shape[0],
        size,
        max_shift=max_shift,
        max_rotation=max_rotation,
        zoom_range=zoom_range,
        isotropic_zoom=isotropic_zoom,
    )
    matrices = jax.vmap(affine_matrix, in_axes=(0, 0, 0, None))(shift, angle, scale, size)
    return apply_affine(images, matrices)


def random_flip(rng: Array, images: Array) -> Array:
    """Mirrors each image left-right with probability 1/2. [B, H, W, C] -> same dtype."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], jnp.flip(images, axis=2), images)


def mixup_params(rng: Array, batch_size: int, alpha: float) -> tuple[Array, Array]:
    """The mixing weight lambda ~ Beta(alpha, alpha), one per batch, and the partner permutation."""
    k_lam, k_perm = jax.random.split(rng)
    lam = jax.random.beta(k_lam, alpha, alpha)
    return lam, jax.random.permutation(k_perm, batch_size)


def mixup(rng: Array, images: Array, targets: Array, alpha: float) -> tuple[Array, Array]:
    """lambda * x + (1 - lambda) * x[perm] for the images and their target distributions alike."""
    lam, perm = mixup_params(rng, images.shape[0], alpha)
    mixed_images = lam * images + (1 - lam) * images[perm]
    mixed_targets = lam * targets + (1 - lam) * targets[perm]
    return mixed_images.astype(images.dtype), mixed_targets.astype(targets.dtype)


def augment(rng: Array, images: Array, config: Any) -> Array:
    """The paper's training augmentation followed by per-image standardisation.

    Args:
      rng: PRNG key.
      images: uint8 [B, H, W, C].
      config: fields `shift` (fraction of height/width), `rotation` (degrees), `zoom` (range),
        `flip` (bool) and `isotropic_zoom` (bool); 0 or False turns an op off. Read at trace
        time, so they must be Python values.

    Returns:
      float32 [B, H, W, C], standardised per image.
    """
    k_affine, k_flip = jax.random.split(rng)
    x = jnp.asarray(images).astype(jnp.float32)
    if config.shift or config.rotation or config.zoom:
        x = random_affine(
            k_affine,
            x,
            max_shift=float(config.shift),
            max_rotation=float(config.rotation),
            zoom_range=float(config.zoom),
            isotropic_zoom=bool(config.isotropic_zoom),
        )
    if config.flip:
        x = random_flip(k_flip, x)
    return standardize(x)
