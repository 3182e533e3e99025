"""Final (stand-alone) CIFAR training of a fixed architecture (spec §6.1-§6.6).

Two entry points, used by ``experiments/train_cifar.py``, ``experiments/evaluate_cifar.py``,
notebooks and tests::

    metrics = train_and_evaluate(config, workdir)   # trains or resumes; writes metrics.json
    metrics = evaluate_checkpoint(config, workdir)  # scores the latest (or a given) checkpoint

``config`` is an ``ml_collections.ConfigDict`` (or dict) with the keys of ``default_config()``;
missing keys take those defaults, unknown keys are an error. The architecture is a built-in name
(``config.arch = 'NAONet-A'``) or an official string of a CNN space (``config.arch_string`` and
``config.space``), so cells found by a search are retrained the same way.

The run directory::

    config.json        the resolved config; a rerun with a different one is refused
    checkpoints/<step> Orbax: params, BN statistics, optimizer state, step, RNG key; the JSON
                       metadata holds the data position (epoch, batch in epoch) and the wall time
    tb/                TensorBoard scalars: train/{loss,ce,aux_ce,accuracy,lr,grad_norm,img_per_s},
                       {test,dev}/{accuracy,loss}
    metrics.json       final metrics (written once training has finished)
    eval_<step>.json   written by ``evaluate_checkpoint``

In a multi-process run (``--distributed``) all processes share the run directory: every process
reads it (``config.json``, the checkpoints, ``metrics.json``) and calls the collective Orbax
saves; only the primary process (``parallel.is_primary()``) writes the plain files above.

Resume is exact: the training batch of step ``s`` is a pure function of ``(seed, s)`` (an epoch
permutation drawn from ``(seed, epoch)``, then position ``s mod steps_per_epoch`` in it), the
augmentation and drop-path keys are ``fold_in(rng, s)``, and a checkpoint holds everything else,
so a killed and rerun command ends with bit-identical parameters and metrics on CPU.

Choices that differ from the official code, each named where it is configured:

* ``data.drop_remainder`` (fixed True): every epoch has ``floor(N / batch)`` full batches (390 of
  128 on 50k); PT also runs the last partial batch of 80, TF-NAO batches across epoch boundaries.
  A partial batch would compile a second program; the 80 left out differ every epoch.
* BatchNorm statistics are over the global batch (one ``jit`` over the mesh); PT DataParallel
  normalises each GPU's share separately. Identical on one device.
* The rest are config switches: ``train.l2_form``, ``train.decay_before_clip``,
  ``train.drop_path_step_offset``, ``data.normalization``, ``data.cutout_style`` and the
  ``model.*`` structure switches of ``network.NetworkConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from nao_jax.config_utils import check_choice, merge_sections
from nao_jax import parallel
from nao_jax import preemption
from nao_jax import spaces
from nao_jax.checkpoint import RunCheckpointer, write_json_atomic
from nao_jax.cnn import network as network_lib
from nao_jax.cnn import train as train_lib
from nao_jax.data import augment
from nao_jax.data import cifar
from nao_jax.progress import ScalarWriter

SOURCES = ('auto', 'tfds', 'python', 'folder', 'npz', 'synthetic')
SPLITS = ('train', 'train_dev')
LR_SCHEDULES = ('cosine', 'sgdr')
L2_FORMS = ('half_sum_sq', 'sum_sq')
MEAN_STD_STATS = ('cifar10', 'train')
CNN_SPACES = ('cnn_nao', 'cnn_ws')
TFDS_REQUIREMENTS = 'requirements-tfds.txt'
# Keys that may change when a run directory is resumed: none of them changes what is computed.
RESUME_TOLERATED_KEYS = ('train.max_steps', 'log_every_steps', 'eval_every_epochs',
                         'checkpoint_every_steps', 'keep_checkpoints', 'data.path',
                         'data.tfds_data_dir', 'data.cache_dir', 'train.eval_batch_size')


class DivergenceError(RuntimeError):
  """Training produced a non-finite loss or state; the last good checkpoint is kept."""


# -- config ---------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
  """Every key the library reads, with the seed's NAONet CIFAR-10 recipe as defaults.

  The experiment configs (``experiments/configs/naonet_*_cifar*.py``) set every key explicitly;
  this is the schema they are checked against.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Architecture: a built-in name, or an official string of `space` (then arch must be '').
  config.arch = 'NAONet-A'
  config.arch_string = ''
  config.space = ''  # cnn_nao (11 ops) | cnn_ws (5 ops); only with arch_string

  # network.NetworkConfig fields (PT-V1 structure) and the auxiliary loss weight.
  config.model = ml_collections.ConfigDict(dict(
      layers=6,                    # N normal cells per stage
      channels=128,                # F
      stem_multiplier=3,
      use_aux_head=True,
      aux_weight=0.4,
      drop_path_keep=0.7,
      dropout_keep=0.6,
      drop_path_identity=True,     # PT since 41efeed; TF never drops identity branches
      relu_before_gap=False,       # TF: True
      avg_pool_exclude_pad=False,  # TF: True
      aux_head_tf_position=False,  # TF: True
      merge_convs=True,            # same function, faster on CPU
  ))

  config.data = ml_collections.ConfigDict(dict(
      name='cifar10',              # cifar10 | cifar100
      source='auto',               # auto | tfds | python | folder | npz | synthetic
      path='',                     # file or folder for local sources; '' = $NAO_DATA_DIR
      split='train',               # train: 50k, evaluate on test | train_dev: 45k, evaluate on dev
      num_dev=5000,
      dev_seed=0,
      limit_per_class=0,           # image folders: first k images per class and split (0: all)
      train_subset=0,              # a seeded random subset of the training split (0: all)
      synthetic_train=256,         # sizes of the 'synthetic' source (class-coloured noise)
      synthetic_test=64,
      normalization='per_image',   # per_image (TF-NAO "whitening", the seed) | mean_std (PT, TF-WS)
      mean_std_stats='cifar10',    # mean_std: PT's CIFAR-10 constants | train: of the train split
      pad=4,                       # zero padding before the random 32x32 crop (40x40)
      cutout=16,                   # 0 disables
      cutout_style='pytorch',      # pytorch: centre uniform | tf: top-left corner uniform
      tfds_data_dir='',
      cache_dir='',                # image folders: cache of decoded arrays
  ))

  config.train = ml_collections.ConfigDict(dict(
      epochs=600,
      batch_size=128,
      eval_batch_size=500,         # PT 500, TF 100 (padded and masked at the end of the set)
      momentum=0.9,
      nesterov=False,              # TF-WS: True
      lr_schedule='cosine',        # cosine: one period over all epochs | sgdr: warm restarts
      lr_max=0.024,
      lr_min=0.0,
      sgdr_t0=10,                  # sgdr: first period in epochs
      sgdr_t_mul=2,                # sgdr: period multiplier
      weight_decay=5e-4,
      l2_form='half_sum_sq',       # half_sum_sq: TF-NAO / PT (gradient wd*w) | sum_sq: TF-WS (2wd*w)
      decay_before_clip=False,     # PT: clip, then add wd*w | TF: L2 is in the loss, so clipped too
      grad_clip=5.0,               # global norm; 0 disables (TF-WS's clip is a no-op, spec §9.1 #4)
      drop_path_step_offset=1,     # PT: r_step = (step + 1) / total; TF-NAO: 0
      max_steps=0,                 # stop (with a checkpoint) after this many steps; 0: train on
  ))

  config.log_every_steps = 50
  config.eval_every_epochs = 5     # and always at the end
  config.checkpoint_every_steps = 0  # 0: at the end of every epoch
  config.keep_checkpoints = 2
  return config


def resolve_config(config) -> ml_collections.FrozenConfigDict:
  """Merges ``config`` into ``default_config()`` and checks every value; no work is done.

  Raises:
    ValueError: an unknown key, a value out of range, an unknown or malformed architecture.
  """
  values = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  merged = merge_sections(default_config().to_dict(), values, '')
  cfg = ml_collections.FrozenConfigDict(merged)
  check_choice('data.name', cfg.data.name, tuple(cifar.NUM_CLASSES))
  check_choice('data.source', cfg.data.source, SOURCES)
  check_choice('data.split', cfg.data.split, SPLITS)
  check_choice('data.normalization', cfg.data.normalization, augment.NORMALIZATIONS)
  check_choice('data.mean_std_stats', cfg.data.mean_std_stats, MEAN_STD_STATS)
  check_choice('data.cutout_style', cfg.data.cutout_style, augment.CUTOUT_STYLES)
  check_choice('train.lr_schedule', cfg.train.lr_schedule, LR_SCHEDULES)
  check_choice('train.l2_form', cfg.train.l2_form, L2_FORMS)
  for name, value, low in (('train.epochs', cfg.train.epochs, 1),
                           ('train.batch_size', cfg.train.batch_size, 1),
                           ('train.eval_batch_size', cfg.train.eval_batch_size, 1),
                           ('model.layers', cfg.model.layers, 1),
                           ('model.channels', cfg.model.channels, 2),
                           ('train.sgdr_t0', cfg.train.sgdr_t0, 1),
                           ('train.sgdr_t_mul', cfg.train.sgdr_t_mul, 1),
                           ('log_every_steps', cfg.log_every_steps, 1),
                           ('eval_every_epochs', cfg.eval_every_epochs, 1),
                           ('keep_checkpoints', cfg.keep_checkpoints, 1),
                           ('train.max_steps', cfg.train.max_steps, 0),
                           ('checkpoint_every_steps', cfg.checkpoint_every_steps, 0)):
    if int(value) != value or value < low:
      raise ValueError(f'{name} = {value!r}; expected an integer >= {low}')
  for name, value in (('model.drop_path_keep', cfg.model.drop_path_keep),
                      ('model.dropout_keep', cfg.model.dropout_keep)):
    if not 0.0 < value <= 1.0:
      raise ValueError(f'{name} = {value!r}; expected a keep probability in (0, 1]')
  if cfg.model.channels % 2:
    raise ValueError(f'model.channels = {cfg.model.channels}: factorized reductions need an '
                     'even number of channels')
  devices = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if cfg.train[name] % devices:
      raise ValueError(f'train.{name} = {cfg.train[name]} is not a multiple of the {devices} '
                       'devices the batch is split over')
  build_arch(cfg)
  return cfg


def build_arch(cfg) -> tuple[spaces.SearchSpace, np.ndarray]:
  """``(space, int32[2, 5, 4])`` from ``cfg.arch`` or ``cfg.arch_string`` + ``cfg.space``."""
  if cfg.arch_string:
    if cfg.arch:
      raise ValueError(f"set either arch ({cfg.arch!r}) or arch_string, not both "
                       "(--config.arch='' to use the string)")
    if cfg.space not in CNN_SPACES:
      raise ValueError(f'arch_string needs space = {" or ".join(CNN_SPACES)}, got {cfg.space!r}')
    space = spaces.get_space(cfg.space)
    return space, space.parse(cfg.arch_string)
  if not cfg.arch:
    raise ValueError('no architecture: set arch (a built-in name) or arch_string and space')
  space, arch = spaces.get_builtin(cfg.arch)
  if space.name not in CNN_SPACES:
    raise ValueError(f'arch {cfg.arch!r} is a {space.name} architecture, not a CNN cell')
  if cfg.space and cfg.space != space.name:
    raise ValueError(f'arch {cfg.arch!r} belongs to space {space.name!r}, config says '
                     f'{cfg.space!r}')
  return space, arch


def network_config(cfg, num_classes: int) -> network_lib.NetworkConfig:
  model = dict(cfg.model)
  model.pop('aux_weight')
  return network_lib.NetworkConfig(num_classes=num_classes, **model)


# -- learning rate ---------------------------------------------------------------------------------


def sgdr_lr(epoch, lr_max: float, lr_min: float, t0: int, t_mul: int):
  """SGDR (Loshchilov & Hutter) learning rate of a whole epoch (spec §6.5 notes).

  ``lr = lr_min + (lr_max - lr_min) (1 + cos(pi T_cur / T_i)) / 2``; periods ``T_i = t0 t_mul^i``
  start at epochs ``0, t0, t0 + t0 t_mul, ...`` (T_cur counts epochs since the last restart).
  ``t0 = epochs, t_mul = 1`` is the single-period cosine (TF ``T_0 = 600``; PT
  ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch).

  Args:
    epoch: int, ``int[...]`` numpy or traced array of epochs (0-based).

  Returns:
    float32 learning rate(s) of the same shape (numpy in, numpy out).
  """
  xp = jnp if isinstance(epoch, jax.Array) else np
  epoch = xp.asarray(epoch)
  # Restart epochs as an exact integer table: 64 periods outlast any schedule with t_mul >= 2
  # (and t_mul = 1 is a modulo).
  if t_mul == 1:
    t_cur, t_i = epoch % t0, xp.full_like(epoch, t0)
  else:
    starts = np.cumsum([0] + [t0 * t_mul ** i for i in range(40)], dtype=np.float64)
    periods = np.array([t0 * t_mul ** i for i in range(41)], np.float64)
    cycle = xp.sum(epoch[..., None] >= xp.asarray(starts[1:]), axis=-1)
    t_cur = epoch - xp.asarray(starts)[cycle]
    t_i = xp.asarray(periods)[cycle]
  frac = xp.asarray(t_cur, xp.float32) / xp.asarray(t_i, xp.float32)
  lr = lr_min + (lr_max - lr_min) * 0.5 * (1.0 + xp.cos(np.float32(np.pi) * frac))
  return xp.asarray(lr, xp.float32)


def make_schedule(train_cfg, steps_per_epoch: int) -> optax.Schedule:
  """The per-step learning rate: constant within an epoch, per ``train_cfg.lr_schedule``."""
  if train_cfg.lr_schedule == 'cosine':
    t0, t_mul = train_cfg.epochs, 1
  else:
    t0, t_mul = train_cfg.sgdr_t0, train_cfg.sgdr_t_mul
  lr_max, lr_min = float(train_cfg.lr_max), float(train_cfg.lr_min)
  last = train_cfg.epochs - 1

  def schedule(count):
    xp = jnp if isinstance(count, jax.Array) else np
    # After the last epoch (evaluation, logging) the rate stays at the last epoch's value.
    epoch = xp.minimum(xp.asarray(count) // steps_per_epoch, last)
    return sgdr_lr(epoch, lr_max, lr_min, t0, t_mul)
  return schedule


def make_optimizer(train_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum, coupled L2 and optional global-norm clipping (spec §6.5).

  ``l2_form``: ``half_sum_sq`` adds ``wd * w`` to the gradient (TF-NAO's ``wd/2 sum w^2`` in the
  loss; PT's ``weight_decay``); ``sum_sq`` adds ``2 wd * w`` (TF-WS puts ``wd sum w^2`` in the
  loss). ``decay_before_clip``: the decay term is clipped with the gradient (TF, where L2 is part
  of the loss) rather than added after clipping (PT).
  """
  decay = train_cfg.weight_decay * (2.0 if train_cfg.l2_form == 'sum_sq' else 1.0)
  clip = float(train_cfg.grad_clip) or None
  if not train_cfg.decay_before_clip:
    return train_lib.make_optimizer(schedule, momentum=train_cfg.momentum, weight_decay=decay,
                                    clip_norm=clip, nesterov=train_cfg.nesterov)
  parts = [optax.add_decayed_weights(decay)]
  if clip:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.sgd(schedule, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov))
  return optax.chain(*parts)


# -- data -----------------------------------------------------------------------------------------


class Dataset(NamedTuple):
  """The splits of one run in host memory.

  Attributes:
    x_train: ``uint8[N, 32, 32, 3]``; y_train: ``int32[N]``.
    x_eval: ``uint8[M, 32, 32, 3]`` (test set, or the dev split); y_eval: ``int32[M]``.
    eval_split: 'test' or 'dev'.
    num_classes: 10 or 100.
    mean, std: ``float32[3]`` for ``normalization='mean_std'`` (None otherwise).
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_eval: np.ndarray
  y_eval: np.ndarray
  eval_split: str
  num_classes: int
  mean: np.ndarray | None
  std: np.ndarray | None


def data_path(cfg) -> str | None:
  """The local data location: ``data.path``, else ``$NAO_DATA_DIR``, else None (tfds)."""
  return cfg.data.path or os.environ.get('NAO_DATA_DIR') or None


def check_data(cfg) -> None:
  """Fails fast (before any work) when the configured data cannot be there."""
  source, path = cfg.data.source, data_path(cfg)
  if source == 'synthetic':
    return
  if source in ('python', 'folder', 'npz') and path is None:
    raise ValueError(f'data.source = {source!r} needs data.path (or $NAO_DATA_DIR)')
  if path is not None and source != 'tfds' and not os.path.exists(path):
    raise FileNotFoundError(f'data.path {path} does not exist')
  if source == 'tfds' or (source == 'auto' and path is None):
    if importlib.util.find_spec('tensorflow_datasets') is None:
      raise ImportError(
          f'data.source = {source!r} reads CIFAR with tensorflow-datasets, which is not '
          f'installed: pip install -r {TFDS_REQUIREMENTS} (or set data.path / $NAO_DATA_DIR '
          'to local CIFAR files)')


def load_data(cfg) -> Dataset:
  """Loads the configured CIFAR splits into host memory (once per run)."""
  check_data(cfg)
  d = cfg.data
  if d.source == 'synthetic':
    data = synthetic_cifar(d.name, d.synthetic_train, d.synthetic_test, seed=cfg.seed)
  else:
    try:
      data = cifar.load_cifar(
          d.name, d.source, data_path(cfg), tfds_data_dir=d.tfds_data_dir or None,
          limit_per_class=d.limit_per_class or None, cache_dir=d.cache_dir or None)
    except ImportError as e:
      raise ImportError(f'{e} -- pip install -r {TFDS_REQUIREMENTS}') from e
  x_train, y_train = data.x_train, data.y_train
  if d.split == 'train_dev':
    x_train, y_train, x_eval, y_eval = cifar.dev_split(x_train, y_train, d.num_dev, d.dev_seed)
    eval_split = 'dev'
  else:
    x_eval, y_eval, eval_split = data.x_test, data.y_test, 'test'
  if d.train_subset:
    if d.train_subset > len(x_train):
      raise ValueError(f'data.train_subset = {d.train_subset} exceeds the {len(x_train)} '
                       'training images')
    keep = np.sort(np.random.default_rng(d.dev_seed).permutation(len(x_train))[:d.train_subset])
    x_train, y_train = x_train[keep], y_train[keep]
  mean = std = None
  if d.normalization == 'mean_std':
    if d.mean_std_stats == 'train':
      mean, std = augment.channel_mean_std(x_train)
    else:
      mean, std = np.float32(augment.CIFAR10_MEAN), np.float32(augment.CIFAR10_STD)
  if len(x_train) < cfg.train.batch_size:
    raise ValueError(f'{len(x_train)} training images cannot fill one batch of '
                     f'{cfg.train.batch_size}')
  logging.info('data: %s %s, %d training images, %d %s images', d.name, d.source, len(x_train),
               len(x_eval), eval_split)
  return Dataset(x_train, y_train, x_eval, y_eval, eval_split, data.num_classes, mean, std)


def synthetic_cifar(name: str, num_train: int, num_test: int, seed: int = 0) -> cifar.CifarData:
  """Random CIFAR-shaped data with a learnable signal (a class colour under noise).

  For tests and machines without CIFAR. ``uint8[N, 32, 32, 3]`` images, ``int32[N]`` labels.
  """
  num_classes = cifar.NUM_CLASSES[name]
  rng = np.random.default_rng([seed, 7])
  colours = rng.uniform(40, 215, (num_classes, 3))

  def draw(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    noise = rng.normal(0.0, 40.0, (n, 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels
  return cifar.CifarData(*draw(num_train), *draw(num_test), num_classes)


class EpochBatcher:
  """Training batches in a seeded order per epoch; the data position is the step.

  Epoch ``e`` visits the training set in the order ``default_rng([seed, e]).permutation(N)``;
  step ``s`` takes batch ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``. The last
  ``N mod batch`` images of each epoch's order are left out (``drop_remainder``).
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
    self.steps_per_epoch = num_examples // batch_size
    self._epoch, self._perm = None, None

  def permutation(self, epoch: int) -> np.ndarray:
    """``int64[N]``: the order of epoch ``epoch``."""
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self.seed, 1, epoch]).permutation(self.num_examples)
    return self._perm

  def position(self, step: int) -> tuple[int, int]:
    """``(epoch, batch_in_epoch)`` of step ``step``."""
    return divmod(int(step), self.steps_per_epoch)

  def indices(self, step: int) -> np.ndarray:
    """``int64[batch_size]``: the training examples of step ``step``."""
    epoch, pos = self.position(step)
    return self.permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]


# -- devices --------------------------------------------------------------------------------------


class Placement(NamedTuple):
  """The mesh and how arrays live on it: batches split on 'data', everything else replicated."""
  mesh: jax.sharding.Mesh
  data: NamedSharding
  replicated: NamedSharding


def make_placement() -> Placement:
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  return Placement(mesh, NamedSharding(mesh, P('data')), NamedSharding(mesh, P()))


def global_batch(placement: Placement, *host_arrays: np.ndarray) -> list[jax.Array]:
  """Global arrays split over the mesh from full host batches (each process feeds its rows)."""
  count, index = jax.process_count(), jax.process_index()
  out = []
  for x in host_arrays:
    rows = len(x) // count
    local = x[index * rows:(index + 1) * rows]
    out.append(jax.make_array_from_process_local_data(placement.data, local, x.shape))
  return out


# -- state and steps ------------------------------------------------------------------------------


class State(NamedTuple):
  """What a checkpoint holds besides the data position (which is ``train.step``).

  Attributes:
    train: ``train.TrainState`` (step, params, batch_stats, opt_state).
    rng: typed key; step ``s`` uses ``fold_in(rng, s)`` for augmentation, drop-path and dropout.
  """
  train: train_lib.TrainState
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Program:
  """The compiled pieces of a run, built once per (architecture, recipe, data size)."""
  network: network_lib.FixedNetwork
  schedule: optax.Schedule
  steps_per_epoch: int
  total_steps: int
  init: Callable[[jax.Array], State]
  train_step: Callable[..., tuple[State, dict[str, jax.Array]]]
  eval_step: Callable[..., dict[str, jax.Array]]
  all_finite: Callable[[State], jax.Array]
  placement: Placement


def _program_key(cfg, num_classes: int, num_train: int, mean, std) -> str:
  relevant = {k: cfg[k].to_dict() if hasattr(cfg[k], 'to_dict') else cfg[k]
              for k in ('arch', 'arch_string', 'space', 'model', 'train')}
  relevant['train'] = {k: v for k, v in relevant['train'].items() if k != 'max_steps'}
  relevant['data'] = {k: cfg.data[k] for k in ('normalization', 'pad', 'cutout', 'cutout_style')}
  relevant.update(num_classes=num_classes, num_train=num_train, devices=jax.device_count(),
                  mean=None if mean is None else np.asarray(mean).tolist(),
                  std=None if std is None else np.asarray(std).tolist())
  return json.dumps(relevant, sort_keys=True)


def build_program(cfg, num_classes: int, num_train: int, mean=None, std=None) -> Program:
  """The network, schedule and jitted functions for ``cfg`` (cached: a second run with the same
  architecture and recipe in one process, e.g. a resume in a notebook, does not recompile)."""
  return _build_program(_program_key(cfg, num_classes, num_train, mean, std))


@functools.lru_cache(maxsize=4)
def _build_program(key: str) -> Program:
  k = json.loads(key)
  cfg = ml_collections.FrozenConfigDict(dict(default_config().to_dict(), arch=k['arch'],
                                             arch_string=k['arch_string'], space=k['space'],
                                             model=k['model'], train=k['train']))
  space, arch = build_arch(cfg)
  network = network_lib.FixedNetwork(space, arch, network_config(cfg, k['num_classes']))
  steps_per_epoch = k['num_train'] // cfg.train.batch_size
  total_steps = steps_per_epoch * cfg.train.epochs
  schedule = make_schedule(cfg.train, steps_per_epoch)
  optimizer = make_optimizer(cfg.train, schedule)
  step_fn = train_lib.make_train_step(network, optimizer, total_steps=total_steps,
                                      aux_weight=cfg.model.aux_weight, jit=False)
  aug = dict(k['data'])
  mean = None if k['mean'] is None else jnp.asarray(k['mean'], jnp.float32)
  std = None if k['std'] is None else jnp.asarray(k['std'], jnp.float32)
  offset = int(cfg.train.drop_path_step_offset)
  placement = make_placement()
  rep, dat = placement.replicated, placement.data

  def init(key: jax.Array) -> State:
    init_key, rng = jax.random.split(key)
    return State(train_lib.create_train_state(network, optimizer, init_key), rng)

  def train_step(state: State, images_u8: jax.Array,
                 labels: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One SGD step on a batch.

    Args:
      state: donated; its buffers are reused for the returned state.
      images_u8: ``uint8[B, 32, 32, 3]`` split over 'data'; augmented here, on device.
      labels: ``int32[B]``.

    Returns:
      ``(state, metrics)``; scalar metrics: ``loss`` (CE + aux_weight aux CE, no L2), ``ce``,
      ``aux_ce``, ``accuracy`` (top-1 on the augmented batch), ``grad_norm`` (before clipping),
      ``lr`` (of this step).
    """
    step = state.train.step
    k_aug, k_net = jax.random.split(jax.random.fold_in(state.rng, step))
    images = augment.augment_train(
        images_u8, k_aug, cutout=aug['cutout'] or None, cutout_style=aug['cutout_style'],
        normalization=aug['normalization'], mean=mean, std=std, pad=aug['pad'])
    new_train, metrics = step_fn(state.train, images, labels, k_net, step + offset)
    metrics['lr'] = schedule(step)
    return State(new_train, state.rng), metrics

  def eval_step(params, batch_stats, images_u8: jax.Array, labels: jax.Array,
                mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over one evaluation batch (BN in inference mode).

    Args:
      images_u8: ``uint8[E, 32, 32, 3]``; labels: ``int32[E]``; mask: ``float32[E]``, 0 on the
        padding that fills the last batch.

    Returns:
      ``{'correct', 'loss_sum', 'count'}`` float32 scalars (sums over the unmasked images).
    """
    images = augment.preprocess_eval(images_u8, aug['normalization'], mean, std)
    logits, _, _ = network.apply(params, batch_stats, images, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {'correct': jnp.sum(correct * mask), 'loss_sum': jnp.sum(ce * mask),
            'count': jnp.sum(mask)}

  def all_finite(state: State) -> jax.Array:
    leaves = jax.tree.leaves((state.train.params, state.train.batch_stats, state.train.opt_state))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                              if jnp.issubdtype(x.dtype, jnp.floating)]))

  state_shape = jax.eval_shape(init, jax.random.key(0))
  state_sharding = jax.tree.map(lambda _: rep, state_shape)
  return Program(
      network=network, schedule=schedule, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      init=jax.jit(init, out_shardings=state_sharding),
      train_step=jax.jit(train_step, in_shardings=(state_sharding, dat, dat),
                         out_shardings=(state_sharding, rep), donate_argnums=0),
      eval_step=jax.jit(eval_step, in_shardings=(rep, rep, dat, dat, dat), out_shardings=rep),
      all_finite=jax.jit(all_finite, in_shardings=(state_sharding,), out_shardings=rep),
      placement=placement)


def evaluate(program: Program, state: State, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> dict[str, float]:
  """Accuracy, error and mean cross-entropy over a whole split (BN in inference mode).

  Args:
    images: ``uint8[M, 32, 32, 3]`` host array; labels: ``int32[M]``.
    batch_size: evaluation batch (the last one is padded and masked).

  Returns:
    ``{'accuracy', 'error', 'loss', 'count'}`` (accuracy and error in [0, 1]).
  """
  totals = np.zeros(3, np.float64)
  params, stats = state.train.params, state.train.batch_stats
  pending = []
  for start in range(0, len(images), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    mask = np.ones(batch_size, np.float32)
    if len(x) < batch_size:
      pad = batch_size - len(x)
      mask[len(x):] = 0.0
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    pending.append(program.eval_step(params, stats, *global_batch(program.placement, x, y, mask)))
  for out in jax.device_get(pending):
    totals += [out['correct'], out['loss_sum'], out['count']]
  correct, loss_sum, count = totals
  return {'accuracy': correct / count, 'error': 1.0 - correct / count, 'loss': loss_sum / count,
          'count': int(count)}


# -- run directory --------------------------------------------------------------------------------


def _config_diff(previous: dict, current: dict, ignore: tuple[str, ...] = RESUME_TOLERATED_KEYS,
                 prefix: str = '') -> list[str]:
  diffs = []
  for key in sorted(set(previous) | set(current)):
    name = prefix + key
    if name in ignore:
      continue
    a, b = previous.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _config_diff(a, b, ignore, name + '.')
    elif a != b:
      diffs.append(f'{name}: {a!r} there, {b!r} now')
  return diffs


def _check_workdir_config(workdir: str, cfg, write: bool) -> None:
  path = os.path.join(workdir, 'config.json')
  current = json.loads(json.dumps(cfg.to_dict(), sort_keys=True))
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      previous = json.load(f)
    diff = _config_diff(previous, current)
    if diff:
      raise ValueError(f'{workdir} holds a run with a different config ({"; ".join(diff)}); use '
                       'a new --workdir or the original config')
  if write:
    write_json_atomic(path, current)


def _restore(checkpointer: RunCheckpointer, step: int, program: Program,
             seed: int) -> tuple[State, dict]:
  """Restores straight into replicated device arrays (no host copy of an initialised model)."""
  rep = program.placement.replicated
  abstract = jax.eval_shape(program.init, jax.random.key(seed))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          abstract)
  # A concrete key tells the checkpointer to rebuild a typed key from the stored key data.
  template = abstract._replace(rng=jax.random.key(seed))
  state, meta = checkpointer.restore(step, template)
  # parallel.replicate: in a multi-process run, device_put refuses the restored (host-local) key
  # for a sharding over other processes' devices; it moves the key data instead.
  return parallel.replicate(state, program.placement.mesh), meta


# -- training -------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the configured network and scores it; returns ``metrics.json``.

  Order of work: check the config, the architecture and the data location (a bad value fails
  here, before anything is loaded); load the data into host memory; restore the newest
  checkpoint of ``workdir`` or initialise from ``config.seed``; train, logging every
  ``log_every_steps``, evaluating every ``eval_every_epochs`` and checkpointing every
  ``checkpoint_every_steps`` (each epoch by default); evaluate, checkpoint and write
  ``metrics.json``.

  Returns:
    ``metrics.json``'s content: ``{split}_accuracy``, ``{split}_error``, ``{split}_loss``
    (split 'test', or 'dev' for ``data.split = 'train_dev'``), ``params`` (trainable, with and
    without the auxiliary head), ``epochs``, ``steps``, ``wall_s``, ``train_img_per_s``, ``seed``,
    ``arch`` (official string), ``space``, ``config``, ``finished``; after a ``max_steps`` stop,
    ``finished`` is False and the metrics are of that step.

  Raises:
    ValueError, FileNotFoundError, ImportError: bad config or data, before any work.
    DivergenceError: a non-finite loss or state; the newest checkpoint is the last good one.
  """
  cfg = resolve_config(config)
  check_data(cfg)
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(workdir, cfg, write=parallel.is_primary())
  start_time = time.time()

  # -- data: loaded once into host memory -------------------------------------------------------
  data = load_data(cfg)
  data_load_s = time.time() - start_time
  program = build_program(cfg, data.num_classes, len(data.x_train), data.mean, data.std)
  batcher = EpochBatcher(len(data.x_train), cfg.train.batch_size, cfg.seed)
  spe, total = program.steps_per_epoch, program.total_steps
  stop = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
  counts = network_lib.parameter_counts(program.network)
  space, arch = build_arch(cfg)

  # -- state: own checkpoint, else fresh from the seed ------------------------------------------
  checkpointer = RunCheckpointer(workdir, max_to_keep=cfg.keep_checkpoints)
  latest = checkpointer.latest_step()
  # Every process has seen the checkpoints (and, below, metrics.json) before the primary writes.
  parallel.sync_processes('train_and_evaluate: run directory read')
  wall_before = 0.0
  if latest is not None:
    state, meta = _restore(checkpointer, latest, program, cfg.seed)
    if (meta['steps_per_epoch'], meta['num_train']) != (spe, len(data.x_train)):
      raise ValueError(f'{workdir}: the checkpoint was written with {meta["num_train"]} training '
                       f'images and {meta["steps_per_epoch"]} steps per epoch, now '
                       f'{len(data.x_train)} and {spe}: not the same data')
    wall_before = float(meta.get('wall_s', 0.0))
    logging.info('resuming %s from step %d (epoch %d, batch %d of %d)', workdir, latest,
                 meta['epoch'], meta['batch_in_epoch'], spe)
    metrics_path = os.path.join(workdir, 'metrics.json')
    if latest >= total and os.path.exists(metrics_path):
      with open(metrics_path, encoding='utf-8') as f:
        logging.info('%s has finished already; metrics.json is unchanged', workdir)
        checkpointer.close()
        return json.load(f)
  else:
    state = program.init(jax.random.key(cfg.seed))
    latest = 0
  logging.info('%s (%s), N=%d F=%d: %d parameters (%d without the auxiliary head); %d steps '
               '(%d epochs x %d) of batch %d on %d device(s)', cfg.arch or 'arch_string',
               space.format(arch), cfg.model.layers, cfg.model.channels, counts['total'],
               counts['without_aux'], total, cfg.train.epochs, spe, cfg.train.batch_size,
               jax.device_count())

  writer = ScalarWriter(os.path.join(workdir, 'tb'))
  ckpt_every = cfg.checkpoint_every_steps or spe
  last_saved = latest if checkpointer.latest_step() is not None else None
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  # Throughput over the steps since the last log line, never counting compilation, evaluation
  # or checkpoint writes (the window restarts after each).
  window = {'start': None, 'steps': 0}
  img_per_s = 0.0

  def save(step: int, state: State) -> None:
    nonlocal last_saved
    if not bool(program.all_finite(state)):
      raise DivergenceError(
          f'training diverged: the state after step {step} holds non-finite values (not saved); '
          f'the last good checkpoint is {_ckpt_name(checkpointer, last_saved)}')
    epoch, pos = batcher.position(step)
    checkpointer.save(step, state, {
        'step': step, 'epoch': epoch, 'batch_in_epoch': pos, 'steps_per_epoch': spe,
        'num_train': len(data.x_train), 'data_seed': cfg.seed,
        'wall_s': wall_before + time.time() - start_time})
    last_saved = step

  def flush(step: int) -> None:
    """Fetches the metrics of the steps since the last flush, stops on a non-finite loss."""
    nonlocal pending, img_per_s
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not np.isfinite(m['loss']):
        raise DivergenceError(
            f'training diverged: loss {m["loss"]} at step {s} (epoch {s // spe}); the last good '
            f'checkpoint is {_ckpt_name(checkpointer, last_saved)}; lower train.lr_max (in a new '
            '--workdir) or check the data')
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    for k, v in means.items():
      writer.scalar(f'train/{k}', v, step)
    eta = '?'
    if window['start'] is not None and window['steps']:
      steps_per_s = window['steps'] / max(time.time() - window['start'], 1e-9)
      img_per_s = steps_per_s * cfg.train.batch_size
      writer.scalar('train/img_per_s', img_per_s, step)
      eta = _duration((stop - step) / steps_per_s)
    logging.info('step %d/%d (%.1f%%) epoch %d: %.1f img/s, ETA %s; loss %.4f ce %.4f acc %.4f '
                 'lr %.5f grad_norm %.3f', step, total, 100.0 * step / total, step // spe,
                 img_per_s, eta, means['loss'], means['ce'], means['accuracy'], means['lr'],
                 means['grad_norm'])
    pending = []
    restart_window()

  def restart_window(ready=None) -> None:
    if ready is not None:
      jax.block_until_ready(ready)
    window['start'], window['steps'] = time.time(), 0

  def run_eval(step: int, state: State) -> dict[str, float]:
    result = evaluate(program, state, data.x_eval, data.y_eval, cfg.train.eval_batch_size)
    writer.scalar(f'{data.eval_split}/accuracy', result['accuracy'], step)
    writer.scalar(f'{data.eval_split}/loss', result['loss'], step)
    writer.flush()
    logging.info('step %d (epoch %d): %s accuracy %.4f, loss %.4f', step, step // spe,
                 data.eval_split, result['accuracy'], result['loss'])
    return result

  # -- train --------------------------------------------------------------------------------------
  try:
    with preemption.watching():  # SIGTERM sets a flag checked after every step
      for step in range(latest, stop):
        rows = batcher.indices(step)
        images, labels = global_batch(program.placement, data.x_train[rows], data.y_train[rows])
        state, metrics = program.train_step(state, images, labels)
        pending.append((step, metrics))
        if window['start'] is None:  # the first step of this process compiles: not timed
          restart_window(metrics)
        else:
          window['steps'] += 1
        done = step + 1
        epoch_end = done % spe == 0
        do_eval = epoch_end and (done // spe) % cfg.eval_every_epochs == 0 and done < stop
        do_save = done % ckpt_every == 0 or done == stop
        if done % cfg.log_every_steps == 0 or do_eval or do_save or done == stop:
          flush(done)
        if do_eval:
          run_eval(done, state)
        if do_save:
          save(done, state)
        if do_eval or do_save:
          restart_window()
        # A preemption notice (SIGTERM): checkpoint this step, stop; a rerun resumes here.
        if done < stop and preemption.requested(done):
          flush(done)
          if last_saved != done:
            save(done, state)
          logging.info('preemption notice: checkpointed step %d, stopping', done)
          raise preemption.Preempted(done)
    flush(stop)

    # -- final evaluation and metrics.json ------------------------------------------------------
    step = int(jax.device_get(state.train.step))
    result = run_eval(step, state)
    if last_saved != step:
      save(step, state)
  finally:
    writer.close()
    checkpointer.close()
  split = data.eval_split
  metrics = {
      f'{split}_accuracy': result['accuracy'], f'{split}_error': result['error'],
      f'{split}_loss': result['loss'], f'{split}_count': result['count'], 'eval_split': split,
      'step': step, 'steps': total, 'epochs': step / spe, 'steps_per_epoch': spe,
      'finished': step >= total, 'params': counts, 'train_img_per_s': img_per_s,
      'data_load_s': data_load_s,
      'wall_s': wall_before + time.time() - start_time, 'seed': cfg.seed,
      'arch': space.format(arch), 'arch_name': cfg.arch, 'space': space.name,
      'config': cfg.to_dict(),
  }
  if metrics['finished'] and parallel.is_primary():
    write_json_atomic(os.path.join(workdir, 'metrics.json'), metrics)
  logging.info('%s: %s accuracy %.4f (error %.2f %%) after %d steps', workdir, split,
               result['accuracy'], 100 * result['error'], step)
  return metrics


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def _ckpt_name(checkpointer: RunCheckpointer, step: int | None) -> str:
  if step is None:
    return 'none (no checkpoint was written yet)'
  return f'step {step} in {checkpointer.directory}'


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict[str, Any]:
  """Scores a checkpoint of ``workdir`` on the configured evaluation split.

  Args:
    config: the run's config (``None``: the ``config.json`` of ``workdir``); keys that change the
      network or the data must match the run's.
    workdir: a run directory of ``train_and_evaluate``.
    step: the checkpoint step; None for the newest.

  Returns:
    ``{split}_accuracy``, ``{split}_error``, ``{split}_loss``, ``{split}_count``, ``step``,
    ``epochs``, ``arch``, ``space``; also written to ``workdir/eval_<step>.json``.
  """
  if config is None:
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: is {workdir} a training run directory?')
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  cfg = resolve_config(config)
  check_data(cfg)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'{workdir} has no checkpoints/')
  _check_workdir_config(workdir, cfg, write=False)
  checkpointer = RunCheckpointer(workdir, max_to_keep=cfg.keep_checkpoints)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f'{workdir} has no checkpoint')
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f'no checkpoint of step {step} in {workdir}; there are {sorted(steps)}')
    data = load_data(cfg)
    program = build_program(cfg, data.num_classes, len(data.x_train), data.mean, data.std)
    state, meta = _restore(checkpointer, step, program, cfg.seed)
  finally:
    checkpointer.close()
  result = evaluate(program, state, data.x_eval, data.y_eval, cfg.train.eval_batch_size)
  space, arch = build_arch(cfg)
  split = data.eval_split
  metrics = {f'{split}_accuracy': result['accuracy'], f'{split}_error': result['error'],
             f'{split}_loss': result['loss'], f'{split}_count': result['count'],
             'eval_split': split, 'step': step, 'epochs': step / meta['steps_per_epoch'],
             'arch': space.format(arch), 'space': space.name}
  if parallel.is_primary():
    write_json_atomic(os.path.join(workdir, f'eval_{step}.json'), metrics)
  logging.info('%s step %d: %s accuracy %.4f', workdir, step, split, result['accuracy'])
  return metrics


__all__ = ['DivergenceError', 'default_config', 'resolve_config', 'build_arch', 'network_config',
           'sgdr_lr', 'make_schedule', 'make_optimizer', 'Dataset', 'load_data', 'check_data',
           'synthetic_cifar', 'EpochBatcher', 'Placement', 'make_placement', 'global_batch',
           'State', 'Program', 'build_program', 'evaluate', 'train_and_evaluate',
           'evaluate_checkpoint']
