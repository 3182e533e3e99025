"""scikit-learn's handwritten digits as a small CIFAR-shaped data set (the quickstart's data).

``sklearn.datasets.load_digits`` ships with scikit-learn (nothing is downloaded): 1,797 grayscale
8x8 images of the digits 0-9 with intensities 0..16, about 180 per class. Here they become what
the CNN code expects of CIFAR: ``uint8`` RGB images, NHWC, intensities scaled to 0..255 (16 ->
255), upsampled by pixel repetition to ``image_size`` (a multiple of 8; 16 by default, so that
the two reduction cells of a CIFAR network leave 4x4 maps) and repeated over three channels.

The test split is a fixed, class-stratified draw (``num_test`` images, seed ``seed``); what
remains is the training split, from which a search takes its dev split as it does from CIFAR's
50k (``cifar.dev_split``). The same ``(image_size, num_test, seed)`` always gives the same arrays.

    data = load_digits(image_size=16)      # CifarData: x_train uint8[1500, 16, 16, 3], ...
"""

from __future__ import annotations

import numpy as np

from nao_jax.data.cifar import CifarData

NUM_CLASSES = 10
NUM_IMAGES = 1797
DEFAULT_NUM_TEST = 297


def load_digits(image_size: int = 16, num_test: int = DEFAULT_NUM_TEST, seed: int = 0
                ) -> CifarData:
  """The digits as ``CifarData`` (train / test), images ``uint8[N, S, S, 3]``.

  Args:
    image_size: side S of the returned images, a multiple of 8 (8 keeps the originals).
    num_test: images held out as the test split (stratified by class), in ``(0, 1797)``.
    seed: seed of the test split draw.

  Returns:
    ``CifarData`` with ``x_train uint8[1797 - num_test, S, S, 3]``, ``y_train int32[...]``,
    ``x_test``, ``y_test``, ``num_classes = 10``, class names ``'0'..'9'``.

  Raises:
    ValueError: ``image_size`` not a positive multiple of 8, or ``num_test`` out of range.
  """
  if image_size < 8 or image_size % 8:
    raise ValueError(f'digits image_size must be a positive multiple of 8, got {image_size}')
  if not 0 < num_test < NUM_IMAGES:
    raise ValueError(f'digits num_test must be in (0, {NUM_IMAGES}), got {num_test}')
  # Imported here: only this data source needs scikit-learn.
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits()
  images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)   # [1797, 8, 8]
  factor = image_size // 8
  images = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)
  images = np.repeat(images[..., None], 3, axis=-1)                    # [1797, S, S, 3]
  labels = digits.target.astype(np.int32)
  # Stratified: each class gives its share of the test split, so small splits stay balanced.
  rng = np.random.default_rng([seed, 11])
  order = rng.permutation(len(labels))
  ranks = np.empty(len(labels), np.float64)
  for c in range(NUM_CLASSES):
    members = order[labels[order] == c]
    ranks[members] = (np.arange(len(members)) + 0.5) / len(members)
  test = np.sort(np.argsort(ranks, kind='stable')[:num_test])
  train = np.setdiff1d(np.arange(len(labels)), test)
  return CifarData(images[train], labels[train], images[test], labels[test], NUM_CLASSES,
                   tuple(str(c) for c in range(NUM_CLASSES)))


__all__ = ['load_digits', 'NUM_CLASSES', 'NUM_IMAGES', 'DEFAULT_NUM_TEST']
