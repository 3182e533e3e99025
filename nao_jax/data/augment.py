"""On-device CIFAR augmentation and normalisation (pure, jittable JAX).

Training order follows the TF reference (`NAO/cnn/train_cifar.py`): zero-pad to
40x40 and random-crop 32x32, random horizontal flip, normalise, then cutout, so
the cutout square is exactly zero in the normalised image (as in the PyTorch
reference too, where Cutout runs after Normalize).

Two normalisations (NAO_SPEC §6.6):

* ``'per_image'`` (default, TF-NAO): `tf.image.per_image_standardization`,
  (x - mean) / max(std, 1 / sqrt(H * W * C)) over each image, on the 0..255
  scale. The padded zeros of the crop take part in the statistics, as in TF.
* ``'mean_std'`` (PyTorch / TF-WS): x / 255 then per-channel (x - mean) / std,
  CIFAR-10 statistics by default; padded pixels become -mean / std, as with
  torchvision's RandomCrop(padding=4) followed by Normalize.

Two cutout placements: ``'pytorch'`` (centre uniform over the image) and
``'tf'`` (top-left corner uniform in [0, 32)^2); both clip at the border.

Every function works on a whole batch with fixed shapes, so it compiles once per
batch size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
NORMALIZATIONS: tuple[str, ...] = ('per_image', 'mean_std')
CUTOUT_STYLES: tuple[str, ...] = ('pytorch', 'tf')


@functools.partial(jax.jit, static_argnames=('pad',))
def random_crop(images: jax.Array, key: jax.Array, pad: int = 4) -> jax.Array:
    """Zero-pads by `pad` on each side and takes a random crop per image.

    Args:
      images: [B, H, W, C], any dtype.
      key: PRNG key.
      pad: padding on each side; offsets are uniform in [0, 2 * pad].

    Returns:
      [B, H, W, C], same dtype.
    """
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(
        img, (off[0], off[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


@jax.jit
def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2.

    Args:
      images: [B, H, W, C].
      key: PRNG key.

    Returns:
      [B, H, W, C].
    """
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


@functools.partial(
    jax.jit, static_argnames=('batch', 'height', 'width', 'size', 'style'))
def cutout_mask(
    key: jax.Array,
    batch: int,
    height: int,
    width: int,
    size: int = 16,
    style: str = 'pytorch',
) -> jax.Array:
    """Per-image multiplicative cutout masks.

    Args:
      key: PRNG key.
      batch: number of masks B.
      height: image height H.
      width: image width W.
      size: side of the square.
      style: 'pytorch': centre uniform in [0, H) x [0, W), square
        [c - size // 2, c + size // 2) clipped at the border (Cutout of
        DeVries & Taylor, used by NAO_V1); 'tf': top-left corner uniform in
        [0, H) x [0, W), square [t, t + size) clipped (TF-NAO).

    Returns:
      float32[B, H, W, 1]: 0 inside the square, 1 outside.
    """
    if style not in CUTOUT_STYLES:
        raise ValueError(f'Unknown cutout style {style!r}; expected {CUTOUT_STYLES}.')
    ky, kx = jax.random.split(key)
    y = jax.random.randint(ky, (batch, 1), 0, height)
    x = jax.random.randint(kx, (batch, 1), 0, width)
    if style == 'pytorch':
        y, x = y - size // 2, x - size // 2
    # Comparing against the row / column index clips at the border for free.
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_y = (rows >= y) & (rows < y + size)  # [B, H]
    in_x = (cols >= x) & (cols < x + size)  # [B, W]
    inside = in_y[:, :, None] & in_x[:, None, :]
    return jnp.where(inside, 0.0, 1.0)[..., None].astype(jnp.float32)


@jax.jit
def per_image_standardization(images: jax.Array) -> jax.Array:
    """`tf.image.per_image_standardization` over a batch.

    Args:
      images: [B, H, W, C], any real dtype (no rescaling is applied).

    Returns:
      float32[B, H, W, C]: (x - mean) / max(std, 1 / sqrt(H * W * C)), with
      mean and (population) std over each image.
    """
    x = images.astype(jnp.float32)
    num_elements = np.prod(x.shape[1:])
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
    # The floor keeps a constant image finite (it maps to all zeros).
    return (x - mean) / jnp.maximum(std, 1.0 / np.sqrt(num_elements))


@jax.jit
def mean_std_normalize(
    images: jax.Array,
    mean: Sequence[float] | jax.Array = CIFAR10_MEAN,
    std: Sequence[float] | jax.Array = CIFAR10_STD,
) -> jax.Array:
    """Scales to [0, 1] and normalises per channel.

    Args:
      images: uint8[B, H, W, C] (0..255).
      mean: [C] channel means on the [0, 1] scale.
      std: [C] channel standard deviations on the [0, 1] scale.

    Returns:
      float32[B, H, W, C].
    """
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def channel_mean_std(images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of a training set on the [0, 1] scale.

    For TF-WS style normalisation with statistics of the actual split (e.g.
    the 45k search split) or for CIFAR-100.

    Args:
      images_u8: uint8[N, H, W, C] host array.

    Returns:
      (float32[C] mean, float32[C] std).
    """
    x = np.asarray(images_u8)
    if x.dtype != np.uint8:
        raise ValueError(f'Expected uint8 images, got {x.dtype}.')
    # Per-channel histograms give exact float64 moments without a float copy
    # of the whole training set.
    values = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for c in range(x.shape[-1]):
        hist = np.bincount(x[..., c].ravel(), minlength=256) / x[..., c].size
        m = hist @ values
        mean.append(m)
        std.append(np.sqrt(max(hist @ values ** 2 - m ** 2, 0.0)))
    mean, std = np.array(mean), np.array(std)
    return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


def normalize(
    images: jax.Array,
    normalization: str = 'per_image',
    mean: Sequence[float] | jax.Array | None = None,
    std: Sequence[float] | jax.Array | None = None,
) -> jax.Array:
    """Applies the selected normalisation.

    Args:
      images: uint8[B, H, W, C].
      normalization: 'per_image' or 'mean_std'.
      mean: [C] for 'mean_std' (default CIFAR-10 mean).
      std: [C] for 'mean_std' (default CIFAR-10 std).

    Returns:
      float32[B, H, W, C].
    """
    if normalization == 'per_image':
        return per_image_standardization(images)
    if normalization == 'mean_std':
        return mean_std_normalize(
            images, CIFAR10_MEAN if mean is None else mean,
            CIFAR10_STD if std is None else std)
    raise ValueError(
        f'Unknown normalization {normalization!r}; expected {NORMALIZATIONS}.')


@functools.partial(
    jax.jit,
    static_argnames=('cutout', 'cutout_style', 'normalization', 'pad'))
def augment_train(
    images_u8: jax.Array,
    key: jax.Array,
    *,
    cutout: int | None = 16,
    cutout_style: str = 'pytorch',
    normalization: str = 'per_image',
    mean: jax.Array | None = None,
    std: jax.Array | None = None,
    pad: int = 4,
) -> jax.Array:
    """Training augmentation: pad-crop, flip, normalise, cutout.

    Args:
      images_u8: uint8[B, 32, 32, 3].
      key: PRNG key (raw `PRNGKey` or typed `jax.random.key`).
      cutout: cutout square side; None or 0 disables cutout.
      cutout_style: 'pytorch' (centre uniform) or 'tf' (corner uniform).
      normalization: 'per_image' or 'mean_std'.
      mean: float32[C] for 'mean_std' (default CIFAR-10).
      std: float32[C] for 'mean_std' (default CIFAR-10).
      pad: zero padding before the random crop (4 gives 40x40).

    Returns:
      float32[B, 32, 32, 3].
    """
    k_crop, k_flip, k_cut = jax.random.split(key, 3)
    x = random_crop(images_u8, k_crop, pad)
    x = random_flip(x, k_flip)
    x = normalize(x, normalization, mean, std)
    if cutout:
        b, h, w, _ = x.shape
        x = x * cutout_mask(k_cut, b, h, w, cutout, cutout_style)
    return x


@functools.partial(jax.jit, static_argnames=('normalization',))
def preprocess_eval(
    images_u8: jax.Array,
    normalization: str = 'per_image',
    mean: jax.Array | None = None,
    std: jax.Array | None = None,
) -> jax.Array:
    """Evaluation preprocessing: normalisation only.

    Args:
      images_u8: uint8[B, 32, 32, 3].
      normalization: 'per_image' or 'mean_std'.
      mean: float32[C] for 'mean_std' (default CIFAR-10).
      std: float32[C] for 'mean_std' (default CIFAR-10).

    Returns:
      float32[B, 32, 32, 3].
    """
    return normalize(images_u8, normalization, mean, std)
