"""Weight-sharing evaluator: a CIFAR supernet trained on the pool, scoring architectures.

Fits ``nao_jax.search.evaluators``: ``space``, ``higher_is_better``, ``score_name``,
``stationary``, ``evaluate(archs)`` and ``start_round(pool_archs, round_index)``. PT-V1 protocol
(spec §5.2, §5.4): before each round's scoring the supernet trains ``epochs_per_round`` (30)
epochs on the current pool, one architecture per step sampled uniformly (or proportionally to
its stand-alone size, NAO-V2), on a cosine schedule spanning all rounds (150 epochs); every
architecture is then scored by its top-1 accuracy on one 500-image validation batch, BN in
training mode, dropout off.

Usage::

    evaluator = SupernetEvaluator(WsEvaluatorConfig(), x_train, y_train, x_valid, y_valid)
    evaluator.start_round(pool, 0)             # trains 30 epochs on the pool, scores it
    records = evaluator.evaluate(pool)         # [{'score': accuracy, 'cost': seconds}, ...]
    arrays, meta = evaluator.state_dict()      # for RunCheckpointer.save(step, arrays, meta)
    evaluator.load_state_dict(arrays, meta)    # arrays restored into state_dict()[0]'s layout

Validation batches (``score_batches``): ``'fixed'`` (default) scores every architecture on the
same 500 images in every round: PT draws a fresh random batch per architecture and TF a different
sequential one, so part of the score differences between architectures is the batch, not the
architecture (spec §9.1 #15): the controller is trained on that noise. ``'random'`` is PT's
protocol (a random 500 of the 5k split per architecture, deterministic per (seed, round,
architecture)); ``'sequential'`` is TF's (the i-th architecture scored in a round gets batch i
mod 10).

Resume: ``state_dict()`` holds parameters, BatchNorm statistics, optimizer state, step and base
key as arrays, and the round bookkeeping and data position as JSON. Data order and architecture
sampling are pure functions of ``(seed, epoch)`` and ``(seed, step)``, so the step alone fixes the
data position. ``start_round`` is idempotent: called again for a round that has already been
trained (a restart after the round's checkpoint) it trains nothing; called for the round in
progress (a checkpoint taken by ``checkpoint_callback`` mid-round) it trains only the remaining
steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nao_jax import parallel
from nao_jax import preemption
from nao_jax.checkpoint import RunCheckpointer
from nao_jax.cnn import standalone
from nao_jax.cnn import supernet as supernet_lib
from nao_jax.cnn import supernet_train as st
from nao_jax.data import augment
from nao_jax.data import search_split
from nao_jax.data.search_split import SearchData
from nao_jax.progress import ScalarWriter
from nao_jax.spaces import WS_SPACE

SCORE_BATCHES = ('fixed', 'random', 'sequential')


@dataclasses.dataclass(frozen=True)
class WsEvaluatorConfig:
  """Supernet, training and scoring settings (defaults: PT-V1 search).

  Attributes:
    supernet: the supernet (N=3, C=20, drop-path keep 0.9, dropout keep 1.0).
    train: optimizer recipe and schedule; ``train.epochs`` is the length of the cosine and
      drop-path schedules (150 = 5 rounds of 30); ``train.train_size`` is overridden by the data.
    epochs_per_round: supernet epochs before each round's scoring (PT-V1: 30; V2: 50).
    restart_schedule_each_round: NAO-V2's fresh cosine (and drop-path ramp) every round, each
      ``epochs_per_round`` long, instead of one schedule over ``train.epochs``.
    sample_policy: ``'uniform'`` (PT-V1) or ``'params'`` (NAO-V2: probability proportional to the
      parameter count of the stand-alone network with ``param_count_layers`` /
      ``param_count_channels``).
    score_batch_size: validation images per architecture (PT/TF: 500).
    score_batches: ``'fixed'`` (default; see the module docstring), ``'random'`` (PT-V1),
      ``'sequential'`` (TF-WS).
    keep_score_bn_updates: scoring updates the running BN statistics, as PT does (scores never
      depend on them).
    score_capacity: architectures per compiled scoring call (larger pools take several calls;
      padding costs no compute).
    prescore_pool: score the pool at the end of ``start_round`` in one program and answer
      ``evaluate`` from that (the search loop asks one architecture at a time).
    mean, std: per-channel normalisation of the [0, 1] images (PT: CIFAR-10 mean/std).
    log_every: steps between metric fetches (NaN guard, ``progress_callback``).
    seed: data order, architecture sampling, initialisation, drop-path.
    param_count_layers, param_count_channels: stand-alone network of the ``'params'`` policy.
  """
  supernet: supernet_lib.SupernetConfig = supernet_lib.SupernetConfig()
  train: st.TrainConfig = st.TrainConfig()
  epochs_per_round: int = 30
  restart_schedule_each_round: bool = False
  sample_policy: str = 'uniform'
  score_batch_size: int = 500
  score_batches: str = 'fixed'
  keep_score_bn_updates: bool = True
  score_capacity: int = 1024
  prescore_pool: bool = True
  mean: tuple[float, ...] = augment.CIFAR10_MEAN
  std: tuple[float, ...] = augment.CIFAR10_STD
  log_every: int = 100
  seed: int = 0
  param_count_layers: int = 3
  param_count_channels: int = 20


@jax.jit
def _prepare_batch(images_u8, labels, idx, base_key, step, mean, std):
  """Batch ``idx`` of the training images augmented with the step's key, and the key left for
  the training step (drop-path): ``(float32[B, H, W, 3], int32[B], key)``."""
  k_aug, k_net = jax.random.split(jax.random.fold_in(base_key, step))
  x = augment.augment_train(jnp.take(images_u8, idx, axis=0), k_aug, cutout=None,
                            normalization='mean_std', mean=mean, std=std)
  return x, jnp.take(labels, idx, axis=0), k_net


def _digest(archs: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(archs, np.int32).tobytes()).hexdigest()


class SupernetEvaluator:
  """Scores architectures of ``WS_SPACE`` with a weight-sharing supernet.

  Args:
    config: settings.
    train_images: ``uint8[N, H, W, 3]`` (the 45k training part of the search split).
    train_labels: ``int[N]``.
    valid_images: ``uint8[M, H, W, 3]`` (the 5k held-out part).
    valid_labels: ``int[M]``.
    mesh: a mesh with a ``'data'`` axis for data parallelism (batch sharded, state and
      architecture replicated), or None for the default device.
    progress_callback: called with ``{'step', 'round', 'loss', 'accuracy', 'grad_norm', 'lr',
      'arch_index'}`` every ``log_every`` steps.
    checkpoint_callback: called with no arguments every ``checkpoint_every`` steps during
      training (save ``state_dict()`` there to resume mid-round).
    checkpoint_every: steps between ``checkpoint_callback`` calls (0: never).
  """

  space = WS_SPACE
  higher_is_better = True
  score_name = 'ws_valid_accuracy'
  stationary = False

  def __init__(self, config: WsEvaluatorConfig, train_images: np.ndarray,
               train_labels: np.ndarray, valid_images: np.ndarray, valid_labels: np.ndarray, *,
               mesh: jax.sharding.Mesh | None = None,
               progress_callback: Callable[[dict], None] | None = None,
               checkpoint_callback: Callable[[], None] | None = None,
               checkpoint_every: int = 0):
    if config.score_batches not in SCORE_BATCHES:
      raise ValueError(f'score_batches must be one of {SCORE_BATCHES}, '
                       f'got {config.score_batches!r}')
    if config.sample_policy not in st.SAMPLE_POLICIES:
      raise ValueError(f'sample_policy must be one of {st.SAMPLE_POLICIES}, '
                       f'got {config.sample_policy!r}')
    if len(valid_images) < config.score_batch_size:
      raise ValueError(f'{len(valid_images)} validation images < score_batch_size '
                       f'{config.score_batch_size}')
    train_cfg = dataclasses.replace(config.train, train_size=len(train_images))
    if train_cfg.steps_per_epoch < 1:
      raise ValueError(f'{len(train_images)} training images < batch {train_cfg.batch_size}')
    self.config = dataclasses.replace(config, train=train_cfg)
    self.train_config = train_cfg
    self.progress_callback = progress_callback
    self.checkpoint_callback = checkpoint_callback
    self.checkpoint_every = checkpoint_every

    # Devices: replicated state and data, batches sharded over 'data'.
    if mesh is not None:
      mesh = st.auto_mesh(mesh)
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self._data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
      put = lambda x: jax.device_put(x, replicated)
    else:
      self._data_sharding = None
      put = jnp.asarray
    self._put = put

    restart = config.epochs_per_round if config.restart_schedule_each_round else None
    self.supernet, self.optimizer, self._train_step = st.build_train_step(
        config.supernet, train_cfg, restart_every_epochs=restart,
        data_sharding=self._data_sharding)
    spe = train_cfg.steps_per_epoch
    if restart is None:
      self._lr = st.cosine_per_epoch(train_cfg.lr_max, train_cfg.lr_min, train_cfg.epochs, spe)
    else:
      cosine = st.cosine_per_epoch(train_cfg.lr_max, train_cfg.lr_min, restart, spe)
      self._lr = lambda count: cosine(count % (restart * spe))
    self._score = st.build_score_fn(config.supernet,
                                    keep_bn_updates=config.keep_score_bn_updates,
                                    data_sharding=self._data_sharding)

    self._train_images = put(np.asarray(train_images, np.uint8))
    self._train_labels = put(np.asarray(train_labels, np.int32))
    self._mean = jnp.asarray(config.mean, jnp.float32)
    self._std = jnp.asarray(config.std, jnp.float32)
    self._valid_images = put(np.asarray(augment.preprocess_eval(
        jnp.asarray(valid_images, jnp.uint8), 'mean_std', self._mean, self._std)))
    self._valid_labels = put(np.asarray(valid_labels, np.int32))
    self._num_valid = len(valid_images)
    self._key = jax.random.key(config.seed)
    self.state = jax.tree.map(put, st.create_state(self.supernet, self.optimizer,
                                                   jax.random.fold_in(self._key, 0)))
    self._round = -1                 # round whose training was started last
    self._round_start_step = 0
    self._round_done = False
    self._pool_digest = ''
    self._sequential_counter = 0
    self._cache: dict[bytes, dict] = {}
    self.last_metrics: dict[str, float] = {}

  # -- one training step ----------------------------------------------------------------------

  def _step(self, arch: np.ndarray, step: int) -> dict[str, jax.Array]:
    """Global step ``step`` on ``arch``: gather the batch, augment (pad-crop, flip, mean/std;
    no cutout, as PT's search), train. Augmentation is its own small program, so the training
    step is the one ``build_train_step`` shares."""
    images, labels, key = _prepare_batch(self._train_images, self._train_labels,
                                         self._put(self._batch_indices(step)), self._key,
                                         np.int32(step + 1), self._mean, self._std)
    self.state, metrics = self._train_step(self.state, images, labels, arch, key)
    return metrics

  # -- data order -------------------------------------------------------------------------------

  def _batch_indices(self, step: int) -> np.ndarray:
    """Training images of global step ``step``: ``int32[B]`` (a function of (seed, step))."""
    cfg = self.train_config
    epoch, b = divmod(step, cfg.steps_per_epoch)
    perm = np.random.default_rng([self.config.seed, 1, epoch]).permutation(cfg.train_size)
    idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
    if len(idx) < cfg.batch_size:  # partial last batch (drop_last=False): fill from the start
      idx = np.concatenate([idx, perm[:cfg.batch_size - len(idx)]])
    return idx.astype(np.int32)

  def _arch_index(self, step: int, probs: np.ndarray) -> int:
    return int(np.random.default_rng([self.config.seed, 2, step]).choice(len(probs), p=probs))

  def data_position(self) -> dict[str, int]:
    """``{'step', 'epoch', 'batch_in_epoch'}`` of the next training step."""
    step = int(self.state.step)
    epoch, b = divmod(step, self.train_config.steps_per_epoch)
    return {'step': step, 'epoch': epoch, 'batch_in_epoch': b}

  # -- training ---------------------------------------------------------------------------------

  def sampling_probabilities(self, pool_archs: np.ndarray) -> np.ndarray:
    """Per-step probabilities of the pool's architectures under ``config.sample_policy``."""
    return st.sampling_probabilities(pool_archs, self.config.sample_policy,
                                     layers=self.config.param_count_layers,
                                     channels=self.config.param_count_channels)

  def train_steps(self, pool_archs: np.ndarray, num_steps: int, *, probs=None,
                  arch_indices: Sequence[int] | None = None) -> dict:
    """Runs ``num_steps`` supernet steps on architectures drawn from ``pool_archs``.

    Args:
      pool_archs: ``int32[P, 2, 5, 4]``.
      num_steps: steps to run.
      probs: sampling probabilities (default: ``sampling_probabilities(pool_archs)``).
      arch_indices: the pool index of each step's architecture instead of sampling.

    Returns:
      The metrics of the last step (``{}`` if no step ran).
    """
    pool_archs = np.asarray(pool_archs, np.int32)
    if arch_indices is None and num_steps > 0:
      probs = self.sampling_probabilities(pool_archs) if probs is None else probs
    metrics, done_list = None, []
    # With a checkpoint callback, a preemption notice (SIGTERM) checkpoints the step reached
    # (any step is a resumable position) and stops with ``preemption.Preempted``.
    watch = (preemption.watching() if self.checkpoint_callback is not None
             else contextlib.nullcontext())
    with watch:
      for _ in range(num_steps):
        step = int(self.state.step)
        arch_index = (self._arch_index(step, probs) if arch_indices is None
                      else int(arch_indices[len(done_list)]))
        done_list.append(arch_index)
        metrics = self._step(pool_archs[arch_index], step)
        done = step + 1
        if self.config.log_every and done % self.config.log_every == 0:
          self._log(metrics, done, arch_index)
        saved = bool(self.checkpoint_every and self.checkpoint_callback
                     and done % self.checkpoint_every == 0)
        if saved:
          self.checkpoint_callback()
        if self.checkpoint_callback is not None and preemption.requested(done):
          if not saved:
            self.checkpoint_callback()
          raise preemption.Preempted(done)
    if metrics is not None:
      self._log(metrics, int(self.state.step), None)
    return self.last_metrics

  def _log(self, metrics, step: int, arch_index: int | None) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(v) for v in values.values()):
      raise FloatingPointError(f'supernet training diverged at step {step}: {values}')
    values.update(step=step, round=self._round, lr=float(self._lr(step - 1)))
    if arch_index is not None:
      values['arch_index'] = arch_index
    self.last_metrics = values
    if self.progress_callback is not None:
      self.progress_callback(values)

  def start_round(self, pool_archs: np.ndarray, round_index: int) -> None:
    """Trains the supernet ``epochs_per_round`` epochs on ``pool_archs`` (then scores them).

    Idempotent across restarts: a round already trained is not trained again, and the round in
    progress continues from the restored step (the pool must then be the same).
    """
    pool_archs = np.stack([WS_SPACE.validate(a) for a in pool_archs]).astype(np.int32)
    digest = _digest(pool_archs)
    if round_index < self._round or (round_index == self._round and self._round_done):
      if round_index == self._round and digest != self._pool_digest:
        raise ValueError(f'round {round_index} was trained on a different pool')
      return
    if round_index == self._round:
      if digest != self._pool_digest:
        raise ValueError(f'round {round_index} is being resumed with a different pool')
    else:
      self._round, self._round_start_step = round_index, int(self.state.step)
      self._round_done, self._pool_digest = False, digest
    self._cache.clear()
    self._sequential_counter = 0
    total = self.config.epochs_per_round * self.train_config.steps_per_epoch
    remaining = self._round_start_step + total - int(self.state.step)
    self.train_steps(pool_archs, remaining)
    self._round_done = True
    if self.config.prescore_pool:
      self.evaluate(pool_archs)

  # -- scoring ----------------------------------------------------------------------------------

  def _score_indices(self, archs: np.ndarray) -> np.ndarray:
    """``int32[P, V]``: the validation images of each architecture."""
    cfg = self.config
    v = cfg.score_batch_size
    fixed_order = np.random.default_rng([cfg.seed, 3]).permutation(self._num_valid)
    if cfg.score_batches == 'fixed':
      return np.tile(fixed_order[:v].astype(np.int32), (len(archs), 1))
    if cfg.score_batches == 'sequential':
      n_batches = self._num_valid // v
      rows = []
      for _ in archs:
        b = self._sequential_counter % n_batches
        self._sequential_counter += 1
        rows.append(fixed_order[b * v:(b + 1) * v])
      return np.stack(rows).astype(np.int32)
    rows = [np.random.default_rng([cfg.seed, 4, max(self._round, 0),
                                   zlib.crc32(a.tobytes())]).choice(self._num_valid, v,
                                                                    replace=False)
            for a in archs]
    return np.stack(rows).astype(np.int32)

  def score(self, archs: np.ndarray) -> np.ndarray:
    """Accuracy of each architecture with the current shared weights: ``float64[P]``."""
    archs = np.asarray(archs, np.int32).reshape(-1, *WS_SPACE.arch_shape)
    indices = self._score_indices(archs)
    cap = self.config.score_capacity
    out = []
    for start in range(0, len(archs), cap):
      chunk, rows = archs[start:start + cap], indices[start:start + cap]
      n = len(chunk)
      pad = cap - n
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
      rows = np.concatenate([rows, np.repeat(rows[:1], pad, 0)])
      accuracy, stats = self._score(self.state.params, self.state.batch_stats, chunk,
                                    self._valid_images, self._valid_labels, rows,
                                    jnp.asarray(n, jnp.int32))
      self.state = self.state._replace(batch_stats=stats)
      out.append(np.asarray(accuracy, np.float64)[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float64)

  def evaluate(self, archs: Sequence[np.ndarray] | np.ndarray) -> list[dict]:
    """One record per architecture: ``{'score': accuracy in [0, 1], 'cost': seconds}``.

    Scores computed since the last ``start_round`` are reused (the weights have not changed).
    """
    archs = np.stack([np.asarray(a, np.int32) for a in archs]) if len(archs) else np.zeros(
        (0,) + WS_SPACE.arch_shape, np.int32)
    keys = [a.tobytes() for a in archs]
    todo, seen = [], set()
    for a, k in zip(archs, keys):
      if k not in self._cache and k not in seen:
        todo.append(a)
        seen.add(k)
    if todo:
      start = time.perf_counter()
      scores = self.score(np.stack(todo))
      cost = (time.perf_counter() - start) / len(todo)
      for a, s in zip(todo, scores):
        self._cache[a.tobytes()] = {'score': float(s), 'cost': cost}
    return [dict(self._cache[k]) for k in keys]

  # -- resume -----------------------------------------------------------------------------------

  def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, meta)``: the state as a pytree of host (numpy) arrays and JSON-able
    bookkeeping.

    Host copies, because the training step donates the device buffers: a saved reference would
    be invalidated by the next step.
    """
    arrays = jax.device_get({'params': self.state.params, 'batch_stats': self.state.batch_stats,
                             'opt_state': self.state.opt_state, 'step': self.state.step,
                             'rng': jax.random.key_data(self._key)})
    meta = {'round': self._round, 'round_start_step': self._round_start_step,
            'round_done': self._round_done, 'pool_digest': self._pool_digest,
            'sequential_counter': self._sequential_counter, **self.data_position(),
            'seed': self.config.seed}
    return arrays, meta

  def load_state_dict(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    """Restores what ``state_dict`` returned (arrays in the layout of ``state_dict()[0]``)."""
    if meta.get('seed', self.config.seed) != self.config.seed:
      raise ValueError(f'state of seed {meta["seed"]} loaded into an evaluator of seed '
                       f'{self.config.seed}')
    put = lambda x: self._put(np.asarray(x))
    self.state = st.SupernetState(put(arrays['step']).astype(jnp.int32),
                                  jax.tree.map(put, arrays['params']),
                                  jax.tree.map(put, arrays['batch_stats']),
                                  jax.tree.map(put, arrays['opt_state']))
    self._key = jax.random.wrap_key_data(jnp.asarray(arrays['rng'], jnp.uint32))
    self._round = int(meta['round'])
    self._round_start_step = int(meta['round_start_step'])
    self._round_done = bool(meta['round_done'])
    self._pool_digest = str(meta['pool_digest'])
    self._sequential_counter = int(meta.get('sequential_counter', 0))
    self._cache.clear()


__all__ = ['WsEvaluatorConfig', 'SupernetEvaluator', 'SCORE_BATCHES']


# -- the search's evaluator: run directory, resume, re-ranking ------------------------------------

# Scalar keys of the ``ws_cnn`` config section that go straight into ``WsEvaluatorConfig``.
_WS_SCALAR_KEYS = ('epochs_per_round', 'restart_schedule_each_round', 'sample_policy',
                   'score_batch_size', 'score_batches', 'keep_score_bn_updates', 'score_capacity',
                   'prescore_pool', 'log_every', 'seed', 'param_count_layers',
                   'param_count_channels')
# Keys of the section that configure the run rather than the supernet.
_WS_RUN_KEYS = ('supernet', 'train', 'rerank', 'checkpoint_every_steps', 'data_parallel')


class WsCnnEvaluator(SupernetEvaluator):
  """``SupernetEvaluator`` of a search: owns ``<workdir>/supernet`` and re-ranks the finalists.

  What the registry's ``'ws_cnn'`` builds (``from_config``). On top of the supernet:

  * **Resume.** The state (``state_dict()``: parameters, BN statistics, optimizer state, step,
    key; the round bookkeeping) is an Orbax checkpoint under ``<workdir>/supernet``, saved every
    ``checkpoint_every`` training steps and at the end of every round's training and scoring
    (with the round's scores, so a restart answers them without scoring again). A new evaluator
    on the same workdir restores the newest one, and ``start_round(pool, r)`` then trains only
    what is left of round r: the data order, architecture sampling and keys are functions of
    (seed, step), so a search killed mid-round ends exactly as an uninterrupted one (CPU).
  * **Re-ranking** (PT-V1, spec §5.2): ``rerank(archs)`` trains each finalist stand-alone with
    the fixed network (``standalone.train_candidate``; ``rerank_config``: N=3, C=20, drop-path
    keep 0.8, dropout keep 0.6, auxiliary head, cosine 0.025 -> 0.001 over 10 epochs) on the
    training split and scores it on the whole dev split. Each finalist trains in
    ``<workdir>/rerank/<hash>`` (checkpoints every epoch, ``result.json`` when done). In a
    multi-process run the finalists are spread over the processes (finalist ``i`` on process
    ``i mod P``, alone, as the scratch evaluator's candidates) and every process gets every
    score.
  * Progress lines (``log_every``) in the log and ``supernet/*`` scalars in ``<workdir>/tb``.

  Args:
    config: the supernet evaluator's settings.
    data: the search split (``x_train`` trains the supernet and the finalists, ``x_valid``
      scores).
    workdir: the search's run directory; None: nothing is saved (no resume).
    rerank_config: the finalists' stand-alone training.
    checkpoint_every: training steps between mid-round checkpoints (0: round ends only).
    mesh: data parallelism over a ``'data'`` axis (see ``SupernetEvaluator``), or None.
  """

  rerank_score_name = 'standalone_valid_accuracy'

  def __init__(self, config: WsEvaluatorConfig, data: SearchData, workdir: str | None, *,
               rerank_config: standalone.StandaloneConfig = standalone.StandaloneConfig(),
               checkpoint_every: int = 0, mesh: jax.sharding.Mesh | None = None):
    self.data = data
    self.workdir = workdir
    self.rerank_config = rerank_config
    self._checkpointer = None
    self._writer = None
    self._started = None
    super().__init__(config, data.x_train, data.y_train, data.x_valid, data.y_valid, mesh=mesh,
                     progress_callback=self._progress, checkpoint_callback=self.save,
                     checkpoint_every=checkpoint_every)
    if workdir is not None:
      self._checkpointer = RunCheckpointer(workdir, max_to_keep=2, subdir='supernet')
      self._writer = ScalarWriter(os.path.join(workdir, 'tb', 'supernet'))
      latest = self._checkpointer.latest_step()
      if latest is not None:
        self._load(latest)

  # -- resume -----------------------------------------------------------------------------------

  def save(self) -> None:
    """Checkpoints the supernet and this round's scores under ``<workdir>/supernet``."""
    if self._checkpointer is None:
      return
    arrays, meta = self.state_dict()
    meta['train_size'] = self.train_config.train_size
    meta['batch_size'] = self.train_config.batch_size
    meta['score_cache'] = {k.hex(): v for k, v in self._cache.items()}
    step = meta['step']
    if self._checkpointer.latest_step() == step:
      # The same step saved mid-round before the round's end: replace it, so the round-end
      # flag and scores are what a restart finds (a kill in between falls back to the older
      # checkpoint, which only means retraining).
      self._checkpointer.delete(step)
    self._checkpointer.save(step, arrays, meta)

  def _load(self, step: int) -> None:
    meta = self._checkpointer.restore_meta(step)
    here = (self.config.seed, self.train_config.train_size, self.train_config.batch_size)
    there = (meta['seed'], meta['train_size'], meta['batch_size'])
    if here != there:
      raise ValueError(f'{self.workdir}/supernet holds a supernet of (seed, training images, '
                       f'batch) = {there}; this config gives {here}')
    arrays, meta = self._checkpointer.restore(step, self.state_dict()[0])
    self.load_state_dict(arrays, meta)
    self._cache = {bytes.fromhex(k): dict(v) for k, v in meta.get('score_cache', {}).items()}
    logging.info('supernet resumed at step %d (round %d%s)', step, self._round,
                 ', trained and scored' if self._round_done else '')

  def start_round(self, pool_archs: np.ndarray, round_index: int) -> None:
    """Trains what is left of round ``round_index`` (see ``SupernetEvaluator.start_round``),
    scores the pool and checkpoints both."""
    already = round_index < self._round or (round_index == self._round and self._round_done)
    total = self.config.epochs_per_round * self.train_config.steps_per_epoch
    logging.info('supernet round %d: %s on a pool of %d (step %d, %d steps per round)',
                 round_index, 'already trained' if already else 'training', len(pool_archs),
                 int(self.state.step), total)
    self._started = time.time(), int(self.state.step)
    super().start_round(pool_archs, round_index)
    if not already:
      self.save()
      if self._writer is not None and self._cache:
        scores = [v['score'] for v in self._cache.values()]
        step = int(self.state.step)
        self._writer.scalar('supernet/pool_best_score', max(scores), step)
        self._writer.scalar('supernet/pool_mean_score', float(np.mean(scores)), step)
        self._writer.flush()

  def _progress(self, values: dict) -> None:
    """Log line with speed and round ETA; TensorBoard scalars."""
    if self._writer is not None:
      for key in ('loss', 'accuracy', 'grad_norm', 'lr'):
        if key in values:
          self._writer.scalar(f'supernet/{key}', values[key], values['step'])
    rate = eta = None
    if self._started is not None:
      elapsed = time.time() - self._started[0]
      done = values['step'] - self._started[1]
      if done > 0 and elapsed > 0:
        rate = done / elapsed
        end = (self._round_start_step
               + self.config.epochs_per_round * self.train_config.steps_per_epoch)
        eta = (end - values['step']) / rate
    logging.info('supernet round %d step %d: loss %.4f acc %.4f grad_norm %.3f lr %.5f%s',
                 values['round'], values['step'], values['loss'], values['accuracy'],
                 values['grad_norm'], values['lr'],
                 '' if rate is None else f'; {rate:.2f} steps/s, round ETA {eta:.0f}s')

  # -- re-ranking ---------------------------------------------------------------------------------

  def rerank(self, archs: Sequence[np.ndarray] | np.ndarray) -> list[dict]:
    """Stand-alone training of each finalist (PT-V1): ``[{'score': dev accuracy, ...}]``.

    Each record: ``score`` (dev accuracy after the last epoch, or the best one with
    ``rerank_config.score = 'best'``), ``valid_accuracy`` (per evaluation), ``params``,
    ``cost`` (training seconds). A finalist whose training finished before is not trained again;
    one that was interrupted resumes from its newest checkpoint (``LocalCheckpointer``: one
    written by an older version, with Orbax, restarts from step 0). Every process must call
    this with the same finalists; each trains its share (``parallel.spread_over_processes``).
    """
    archs = [WS_SPACE.validate(a) for a in archs]
    return parallel.spread_over_processes(
        archs, lambda share: [self._rerank_one(arch) for arch in share])

  def _rerank_one(self, arch: np.ndarray) -> dict:
    root = None if self.workdir is None else os.path.join(self.workdir, 'rerank')
    result = standalone.train_candidate(
        WS_SPACE, arch, self.rerank_config, self.data,
        standalone.candidate_dir(root, WS_SPACE, arch), seed=self.config.seed,
        tag=f'rerank {WS_SPACE.format(arch)}', process_local=True)
    return {'score': float(result['score']), 'valid_accuracy': result['valid_accuracy'],
            'params': int(result['params']), 'cost': float(result['cost'])}

  def close(self) -> None:
    if self._checkpointer is not None:
      self._checkpointer.close()
    if self._writer is not None:
      self._writer.close()


def resolve_config(config: Mapping[str, Any]
                   ) -> tuple[WsEvaluatorConfig, standalone.StandaloneConfig, dict]:
  """The evaluator's settings from a search config's ``ws_cnn`` section.

  Returns:
    ``(WsEvaluatorConfig, rerank StandaloneConfig, run options)``; run options:
    ``checkpoint_every_steps``, ``data_parallel``. The seed defaults to the search's; the
    classes and the mean / std are the data's (set in ``from_config``).

  Raises:
    ValueError: an unknown key (listing the known ones) or a bad value.
  """
  section = dict(config.get('ws_cnn', {}) or {})
  known = set(_WS_SCALAR_KEYS) | set(_WS_RUN_KEYS)
  unknown = sorted(set(section) - known)
  if unknown:
    raise ValueError(f'unknown ws_cnn config key(s) {unknown}; known: {sorted(known)}')

  def sub(cls, name):
    values = dict(section.get(name, {}) or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - fields)
    if bad:
      raise ValueError(f'unknown ws_cnn.{name} config key(s) {bad}; known: {sorted(fields)}')
    return cls(**values)

  supernet = sub(supernet_lib.SupernetConfig, 'supernet')
  train = sub(st.TrainConfig, 'train')
  scalars = {k: section[k] for k in _WS_SCALAR_KEYS if k in section}
  scalars.setdefault('seed', int(config.get('seed', 0)))
  ws_cfg = WsEvaluatorConfig(supernet=supernet, train=train, **scalars)
  rerank = standalone.config_from_dict(section.get('rerank'), 'ws_cnn.rerank')
  run = {'checkpoint_every_steps': int(section.get('checkpoint_every_steps', 0)),
         'data_parallel': bool(section.get('data_parallel', True))}
  if run['checkpoint_every_steps'] < 0:
    raise ValueError(f'ws_cnn.checkpoint_every_steps must be >= 0, got '
                     f'{run["checkpoint_every_steps"]}')
  return ws_cfg, rerank, run


def from_config(config: Mapping[str, Any], workdir: str | None = None) -> WsCnnEvaluator:
  """The registry's ``'ws_cnn'`` builder: reads the data now, so a bad path fails before any work.

  Reads the ``data`` section (``search_split.DATA_DEFAULTS``: CIFAR from ``data.path`` or
  ``$NAO_DATA_DIR``, the 45k / 5k split; or ``'digits'`` / ``'synthetic'``) and the ``ws_cnn``
  section (``resolve_config``), and restores ``<workdir>/supernet`` if it holds a checkpoint.
  """
  ws_cfg, rerank_cfg, run = resolve_config(config)
  data = search_split.load_search_data(config.get('data'), seed=int(config.get('seed', 0)))
  ws_cfg = dataclasses.replace(
      ws_cfg, supernet=dataclasses.replace(ws_cfg.supernet, num_classes=data.num_classes),
      mean=tuple(float(v) for v in data.mean), std=tuple(float(v) for v in data.std))
  rounds = int((config.get('nao') or {}).get('rounds', 0))
  if rounds and (rounds + 1) * ws_cfg.epochs_per_round != ws_cfg.train.epochs:
    logging.warning('ws_cnn.train.epochs = %d (the schedule) but %d scorings x %d epochs per '
                    'round = %d supernet epochs', ws_cfg.train.epochs, rounds + 1,
                    ws_cfg.epochs_per_round, (rounds + 1) * ws_cfg.epochs_per_round)
  mesh = None
  if run['data_parallel'] and jax.device_count() > 1:
    mesh = jax.make_mesh((jax.device_count(),), ('data',))
  return WsCnnEvaluator(ws_cfg, data, workdir, rerank_config=rerank_cfg,
                        checkpoint_every=run['checkpoint_every_steps'], mesh=mesh)


__all__ += ['WsCnnEvaluator', 'resolve_config', 'from_config']
