"""NAO without weight sharing: every candidate trained from scratch (spec §4.4, TF-NAO-CNN).

The evaluator of TF-NAO's CNN search (``NAO/cnn/train_cifar10_search.sh`` +
``generate_data.py``): each architecture is trained stand-alone on the search's training split
and scored by its **best per-epoch dev accuracy** (TF keeps the minimum per-epoch valid error).
Scores never change, so the search caches them (``stationary``) and a resumed search never
trains an architecture twice: every candidate trains in ``<workdir>/candidates/<hash>`` with
per-epoch checkpoints and a ``result.json`` once finished (``standalone.train_candidate``), so
a kill loses at most one epoch of one candidate.

Devices: candidates are independent, so with several devices (GPUs, TPU cores) a batch of
candidates trains concurrently, one per device, from a thread pool; on one device they train one
after another. Every architecture compiles its own program (the network is static).

Processes (``--distributed``): candidate ``i`` of an ``evaluate`` call trains on process
``i mod process_count`` (on that process's local devices as above), alone: its checkpoints and
``result.json`` in the shared ``candidates/`` are written by that process only. The processes
then exchange their results (``parallel.exchange_json``: JSON through JAX's coordination
service, so a process that finished early may wait for hours and no float is rounded) and every
process returns all of them, the same numbers as one process (each candidate trains on one device
either way). A candidate that fails stops every process: the others raise a ``RuntimeError``
naming the process.

The recipe defaults follow ``train_cifar10_search.sh`` (N=3, F=32, 25 epochs, batch 128,
SGD 0.024 with a cosine of period 100 epochs so only its first quarter is used (spec §9.1 #14),
weight decay 5e-4 as TF's ``wd/2 * sum w^2`` in the loss (clipped with it), clip 5, drop-path
keep 0.7 with identity never dropped, aux head 0.4, per-image standardisation, no cutout).
Named deviations (``scratch_cnn.train`` in the config): the network is the PT macro-structure
of ``network.FixedNetwork`` (TF-NAO always puts ReLU-1x1-BN on h_{i-1} and its aux head one cell
later, spec §5.1), and the last ``N mod batch`` images of each epoch's order are left out.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from nao_jax import parallel
from nao_jax import spaces
from nao_jax.cnn import standalone
from nao_jax.data import search_split
from nao_jax.data.search_split import SearchData

# train_cifar10_search.sh, expressed as a StandaloneConfig.
TF_NAO_SEARCH_RECIPE = dict(
    layers=3, channels=32, use_aux_head=True, aux_weight=0.4, drop_path_keep=0.7,
    dropout_keep=1.0, drop_path_identity=False, epochs=25, batch_size=128, lr_max=0.024,
    lr_min=0.0, lr_period_epochs=100, momentum=0.9, weight_decay=5e-4, l2_form='half_sum_sq',
    decay_before_clip=True, grad_clip=5.0, drop_path_step_offset=0, normalization='per_image',
    cutout=0, score='best', eval_every_epochs=1)

_RUN_KEYS = ('train', 'space', 'devices')


class ScratchEvaluator:
  """Scores architectures by training each from scratch (``evaluate``); stationary.

  Args:
    space: ``cnn_nao`` (TF-NAO's 11-op space) or ``cnn_ws``.
    config: network and recipe of every candidate.
    data: the search split (``x_train`` trains, ``x_valid`` scores).
    workdir: the search's run directory (candidates under ``candidates/``); None: no resume.
    seed: every candidate's seed (initialisation, data order, augmentation).
    devices: where candidates train, one per device at a time (default: all local devices);
      devices of this process only (in a multi-process run every process trains its share).

  Raises:
    ValueError: a device of another process in ``devices``.
  """

  higher_is_better = True
  score_name = 'best_valid_accuracy'
  stationary = True

  def __init__(self, space: spaces.SearchSpace, config: standalone.StandaloneConfig,
               data: SearchData, workdir: str | None, *, seed: int = 0,
               devices: Sequence[jax.Device] | None = None):
    self.space = space
    self.config = config
    self.data = data
    self.workdir = workdir
    self.seed = seed
    self.devices = list(devices or jax.local_devices())
    foreign = [d for d in self.devices if d.process_index != jax.process_index()]
    if foreign:
      raise ValueError(f'devices = {foreign} belong to other processes than this one '
                       f'({jax.process_index()}); pass devices of jax.local_devices()')

  def _train_one(self, arch: np.ndarray, device: jax.Device) -> dict[str, Any]:
    root = None if self.workdir is None else os.path.join(self.workdir, 'candidates')
    result = standalone.train_candidate(
        self.space, arch, self.config, self.data,
        standalone.candidate_dir(root, self.space, arch), seed=self.seed, device=device,
        tag=f'candidate {self.space.format(arch)}', process_local=True)
    return {'score': float(result['score']), 'cost': float(result['cost']),
            'params': int(result['params']), 'last_accuracy': float(result['last_accuracy']),
            'best_epoch': int(result['best_epoch'])}

  def evaluate(self, archs: Sequence[np.ndarray] | np.ndarray) -> list[dict]:
    """Trains (or reads the finished result of) each architecture: ``[{'score', 'cost', ...}]``.

    ``score``: the best per-epoch dev accuracy; ``cost``: training seconds. In a multi-process
    run every process must call this with the same architectures; each trains its share and
    all return every result.
    """
    archs = [self.space.validate(a) for a in archs]
    return parallel.spread_over_processes(archs, self._train_local)

  def _train_local(self, archs: list[np.ndarray]) -> list[dict]:
    """Trains ``archs`` on this process's devices, one per device at a time."""
    if not archs:
      return []
    if len(self.devices) == 1 or len(archs) == 1:
      return [self._train_one(a, self.devices[0]) for a in archs]
    results: list[dict | None] = [None] * len(archs)
    with concurrent.futures.ThreadPoolExecutor(len(self.devices)) as pool:
      for start in range(0, len(archs), len(self.devices)):
        chunk = list(enumerate(archs))[start:start + len(self.devices)]
        futures = {pool.submit(self._train_one, a, d): i
                   for (i, a), d in zip(chunk, self.devices)}
        for future, i in futures.items():
          results[i] = future.result()
    return results  # type: ignore[return-value]

  def start_round(self, pool_archs: np.ndarray, round_index: int) -> None:
    del pool_archs, round_index


def resolve_config(config: Mapping[str, Any]) -> tuple[standalone.StandaloneConfig, dict]:
  """The ``scratch_cnn`` section: ``train`` (StandaloneConfig fields over the TF-NAO recipe),
  ``devices`` (0: all local devices, else the first k).

  Raises:
    ValueError: an unknown key or a bad value.
  """
  section = dict(config.get('scratch_cnn', {}) or {})
  unknown = sorted(set(section) - set(_RUN_KEYS))
  if unknown:
    raise ValueError(f'unknown scratch_cnn config key(s) {unknown}; known: {sorted(_RUN_KEYS)}')
  train = dict(TF_NAO_SEARCH_RECIPE, **dict(section.get('train', {}) or {}))
  cfg = standalone.config_from_dict(train, 'scratch_cnn.train')
  devices = int(section.get('devices', 0))
  if devices < 0:
    raise ValueError(f'scratch_cnn.devices must be >= 0, got {devices}')
  return cfg, {'devices': devices}


def from_config(config: Mapping[str, Any], workdir: str | None = None) -> ScratchEvaluator:
  """The registry's ``'scratch_cnn'`` builder: reads the data now (a bad path fails early)."""
  train_cfg, run = resolve_config(config)
  space = spaces.get_space(config.get('space', 'cnn_nao'))
  if space.name not in ('cnn_nao', 'cnn_ws'):
    raise ValueError(f"space = {space.name!r}: scratch_cnn trains CNN cells ('cnn_nao' or "
                     "'cnn_ws')")
  data = search_split.load_search_data(config.get('data'), seed=int(config.get('seed', 0)))
  if data.x_train.shape[1] < 32 and train_cfg.use_aux_head:
    logging.warning('the auxiliary head needs 32x32 images; disabled for %dx%d images',
                    data.x_train.shape[1], data.x_train.shape[2])
    train_cfg = dataclasses.replace(train_cfg, use_aux_head=False)
  devices = jax.local_devices()
  if run['devices']:
    devices = devices[:run['devices']]
  return ScratchEvaluator(space, train_cfg, data, workdir, seed=int(config.get('seed', 0)),
                          devices=devices)


__all__ = ['ScratchEvaluator', 'TF_NAO_SEARCH_RECIPE', 'resolve_config', 'from_config']
