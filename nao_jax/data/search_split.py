"""The data of a CNN architecture search: a training split and a held-out dev split.

A search never looks at the test set: candidates (or the supernet) train on the training part of
the training set and are scored on a dev split held out from it (PT-V1: a seeded random 90/10
split of CIFAR-10's 50k, 45k / 5k; TF-NAO ``--split_train_valid``: the same sizes). The search
configs' ``data`` section (``DATA_DEFAULTS``) says where the images come from:

* ``source='auto' | 'python' | 'folder' | 'npz' | 'tfds'``: CIFAR through ``cifar.load_cifar``
  (``path``, default ``$NAO_DATA_DIR``; e.g. the JPEG tar ``cifar10/cifar10_jpeg.tar.gz``);
* ``source='digits'``: scikit-learn's handwritten digits (``digits.load_digits``; shipped with
  scikit-learn, nothing to download), ``image_size`` x ``image_size`` x 3;
* ``source='synthetic'``: class-coloured noise of any image size, for tests.

``load_search_data(section, seed)`` returns ``SearchData`` (uint8 images in host memory and the
per-channel mean / std that the ``mean_std`` normalisation uses).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

from absl import logging
import numpy as np

from nao_jax.data import augment, cifar
from nao_jax.data import digits as digits_lib

SOURCES = ('auto', 'tfds', 'python', 'folder', 'npz', 'digits', 'synthetic')
MEAN_STD_STATS = ('cifar10', 'train')

# The ``data`` section of the CNN search configs, with its defaults (PT-V1's 45k / 5k CIFAR-10).
DATA_DEFAULTS: dict[str, Any] = dict(
    name='cifar10',             # cifar10 | cifar100 (CIFAR sources)
    source='auto',              # see SOURCES
    path='',                    # file or folder of local CIFAR files; '' = $NAO_DATA_DIR
    num_dev=5000,               # dev split held out of the training set (scores)
    dev_seed=0,                 # seed of the held-out draw
    train_subset=0,             # keep a seeded random subset of the training part (0: all)
    limit_per_class=0,          # image folders / tars: first k images per class (0: all)
    cache_dir='',               # image folders / tars: cache of decoded arrays
    tfds_data_dir='',
    image_size=16,              # digits and synthetic: image side (digits: multiple of 8)
    num_test=digits_lib.DEFAULT_NUM_TEST,  # digits: test images set aside (never used here)
    synthetic_train=256,        # synthetic: images before the dev split is taken
    mean_std_stats='cifar10',   # mean_std normalisation: PT's CIFAR-10 constants | train split's
)


class SearchData(NamedTuple):
  """A search's images in host memory.

  Attributes:
    x_train: ``uint8[N, H, W, 3]``; y_train: ``int32[N]`` (e.g. CIFAR-10's 45k).
    x_valid: ``uint8[M, H, W, 3]``; y_valid: ``int32[M]`` (the dev split, e.g. 5k).
    num_classes: classifier outputs.
    mean, std: ``float32[3]`` on the [0, 1] scale, for ``mean_std`` normalisation.
    description: one line for logs.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_valid: np.ndarray
  y_valid: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  description: str


def resolve_data_config(section: Mapping[str, Any] | None) -> dict[str, Any]:
  """``DATA_DEFAULTS`` updated with ``section``; checks names and choices (no data is read).

  Raises:
    ValueError: an unknown key or a bad value.
  """
  section = dict(section or {})
  unknown = sorted(set(section) - set(DATA_DEFAULTS))
  if unknown:
    raise ValueError(f'unknown data config key(s) {unknown}; known: {sorted(DATA_DEFAULTS)}')
  cfg = dict(DATA_DEFAULTS, **section)
  if cfg['source'] not in SOURCES:
    raise ValueError(f'data.source = {cfg["source"]!r}; choose one of {", ".join(SOURCES)}')
  if cfg['mean_std_stats'] not in MEAN_STD_STATS:
    raise ValueError(f'data.mean_std_stats = {cfg["mean_std_stats"]!r}; choose one of '
                     f'{", ".join(MEAN_STD_STATS)}')
  if cfg['source'] not in ('digits', 'synthetic') and cfg['name'] not in cifar.NUM_CLASSES:
    raise ValueError(f'data.name = {cfg["name"]!r}; choose one of {sorted(cifar.NUM_CLASSES)}')
  for key in ('num_dev', 'image_size', 'synthetic_train'):
    if int(cfg[key]) < 1:
      raise ValueError(f'data.{key} must be >= 1, got {cfg[key]}')
  return cfg


def data_path(cfg: Mapping[str, Any]) -> str | None:
  """``data.path``, else ``$NAO_DATA_DIR``, else None."""
  return cfg['path'] or os.environ.get('NAO_DATA_DIR') or None


def synthetic_images(num: int, image_size: int, num_classes: int = 10, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Class-coloured noise with a learnable signal: ``(uint8[num, S, S, 3], int32[num])``."""
  rng = np.random.default_rng([seed, 7])
  colours = rng.uniform(40, 215, (num_classes, 3))
  labels = rng.integers(0, num_classes, num).astype(np.int32)
  noise = rng.normal(0.0, 40.0, (num, image_size, image_size, 3))
  images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
  return images, labels


def load_search_data(section: Mapping[str, Any] | None, seed: int = 0) -> SearchData:
  """Loads the training set of the configured source and splits off the dev split.

  Args:
    section: the config's ``data`` section (missing keys: ``DATA_DEFAULTS``).
    seed: the search's seed (only the synthetic images depend on it).

  Raises:
    ValueError, FileNotFoundError, ImportError: bad settings or missing files (before any
      training).
  """
  cfg = resolve_data_config(section)
  source = cfg['source']
  if source == 'digits':
    data = digits_lib.load_digits(int(cfg['image_size']), int(cfg['num_test']), cfg['dev_seed'])
    x, y, num_classes, what = data.x_train, data.y_train, data.num_classes, 'digits'
  elif source == 'synthetic':
    x, y = synthetic_images(int(cfg['synthetic_train']), int(cfg['image_size']), seed=seed)
    num_classes, what = 10, 'synthetic'
  else:
    path = data_path(cfg)
    if source in ('python', 'folder', 'npz') and path is None:
      raise ValueError(f'data.source = {source!r} needs data.path (or $NAO_DATA_DIR)')
    if path is not None and not os.path.exists(path):
      raise FileNotFoundError(f'data.path {path} does not exist')
    data = cifar.load_cifar(cfg['name'], source, path,
                            tfds_data_dir=cfg['tfds_data_dir'] or None,
                            limit_per_class=cfg['limit_per_class'] or None,
                            cache_dir=cfg['cache_dir'] or None)
    x, y, num_classes, what = data.x_train, data.y_train, data.num_classes, cfg['name']
  if not 0 < cfg['num_dev'] < len(x):
    raise ValueError(f'data.num_dev = {cfg["num_dev"]} must be below the {len(x)} training '
                     'images')
  x_train, y_train, x_valid, y_valid = cifar.dev_split(x, y, int(cfg['num_dev']),
                                                       int(cfg['dev_seed']))
  if cfg['train_subset']:
    if cfg['train_subset'] > len(x_train):
      raise ValueError(f'data.train_subset = {cfg["train_subset"]} exceeds the {len(x_train)} '
                       'training images')
    keep = np.sort(np.random.default_rng([cfg['dev_seed'], 1]).permutation(
        len(x_train))[:cfg['train_subset']])
    x_train, y_train = x_train[keep], y_train[keep]
  if cfg['mean_std_stats'] == 'train':
    mean, std = augment.channel_mean_std(x_train)
  else:
    mean = np.asarray(augment.CIFAR10_MEAN, np.float32)
    std = np.asarray(augment.CIFAR10_STD, np.float32)
  description = (f'{what} ({source}): {len(x_train)} training / {len(x_valid)} dev images of '
                 f'{x_train.shape[1]}x{x_train.shape[2]}')
  logging.info('search data: %s', description)
  return SearchData(x_train, y_train.astype(np.int32), x_valid, y_valid.astype(np.int32),
                    num_classes, np.asarray(mean, np.float32), np.asarray(std, np.float32),
                    description)


__all__ = ['SearchData', 'DATA_DEFAULTS', 'SOURCES', 'resolve_data_config', 'load_search_data',
           'synthetic_images', 'data_path']
