"""Stand-alone training of one candidate architecture on a search's split (spec §4.4, §5.2).

Two users:

* NAO without weight sharing (``scratch_evaluator``): every candidate is trained from scratch
  (TF-NAO ``train_cifar10_search.sh``) and scored by its best per-epoch dev accuracy;
* PT-V1's final re-ranking of the NAO-WS finalists (``ws_evaluator.WsCnnEvaluator.rerank``):
  each finalist trained 10 epochs and scored by its dev accuracy at the end.

The network is the fixed-architecture ``network.FixedNetwork`` (PT-V1 structure; the
architecture is static, so every candidate compiles its own program: the compiled programs are
cached per (architecture, recipe, data shape) within a process). One step: gather the batch
(host) -> put it on the candidate's device -> augment there (pad-crop, flip, normalise,
optional cutout; ``augment.augment_train``) -> forward/backward -> clip, L2, SGD momentum.

Data order and randomness are functions of ``(seed, step)`` as in ``final.py``: the batch of step
``s`` is position ``s mod steps_per_epoch`` of the epoch permutation ``default_rng([seed, 1,
epoch])`` (``final.EpochBatcher``; the last ``N mod batch`` images of each epoch's order are left
out, a deviation from PT's partial last batch, named there), augmentation and drop-path keys are
``fold_in(key, s)``. With a ``workdir`` the state is checkpointed (Orbax; with
``process_local``, plain files that one process writes alone) at the end of every epoch and
every ``checkpoint_every_steps``, the per-epoch dev accuracies travel in the checkpoint's
metadata, and ``result.json`` is written once training has finished: a killed training resumes
from its newest checkpoint and ends with the same numbers (CPU: bit-identical), and a finished
one is never trained again.

Devices: ``device`` places the whole training (state, batches, programs) on one device, so that
several candidates can train at the same time, one per device (``scratch_evaluator``), and in a
multi-process run on several processes at once (``process_local``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nao_jax import parallel
from nao_jax.checkpoint import LocalCheckpointer, RunCheckpointer, write_json_atomic
from nao_jax.cnn import final
from nao_jax.cnn import network as network_lib
from nao_jax.cnn import train as train_lib
from nao_jax.data import augment
from nao_jax.data.search_split import SearchData
from nao_jax.spaces.base import SearchSpace

SCORES = ('best', 'last')


@dataclasses.dataclass(frozen=True)
class StandaloneConfig:
  """Network and recipe of a stand-alone candidate training (defaults: PT-V1's re-ranking).

  Attributes:
    layers, channels, stem_multiplier: N normal cells per stage, F, stem width factor.
    use_aux_head, aux_weight: auxiliary head (needs 32x32 images) and its loss weight.
    drop_path_keep, dropout_keep, drop_path_identity: regularisation of ``NetworkConfig``.
    epochs: training epochs.
    batch_size: training images per step.
    eval_batch_size: dev images per evaluation batch (the last one padded and masked).
    lr_max, lr_min: cosine per epoch, ``lr(e) = lr_min + (lr_max - lr_min)(1 + cos(pi e / T)) / 2``.
    lr_period_epochs: T of the cosine in epochs; 0: ``epochs`` (one full half-period). TF-NAO's
      scratch search keeps T = 100 over 25 epochs (spec §9.1 #14).
    momentum, nesterov: SGD.
    weight_decay, l2_form, decay_before_clip: coupled L2 (see ``final.make_optimizer``): PT adds
      ``wd * w`` after clipping; TF has ``wd / 2 * sum w^2`` in the loss, so it is clipped too.
    grad_clip: global-norm clipping bound; 0 disables.
    drop_path_step_offset: drop-path ``r_step = (step + offset) / total`` (PT: 1, TF: 0).
    normalization: ``'mean_std'`` (PT; the data's mean / std) or ``'per_image'`` (TF-NAO).
    pad: zero padding before the random crop.
    cutout: cutout square side (0: none).
    score: ``'best'`` (the best per-epoch dev accuracy: TF-NAO's ``generate_data.py`` keeps the
      minimum error) or ``'last'`` (the dev accuracy after the last epoch: PT-V1's re-ranking).
    eval_every_epochs: dev evaluations during training (always at the end); ``score='best'``
      needs 1 to be the reference's every-epoch minimum.
    checkpoint_every_steps: checkpoints between epoch ends (0: at epoch ends only).
    log_every_steps: steps between metric fetches (NaN guard, log line).
  """
  layers: int = 3
  channels: int = 20
  stem_multiplier: int = 3
  use_aux_head: bool = True
  aux_weight: float = 0.4
  drop_path_keep: float = 0.8
  dropout_keep: float = 0.6
  drop_path_identity: bool = True
  epochs: int = 10
  batch_size: int = 64
  eval_batch_size: int = 500
  lr_max: float = 0.025
  lr_min: float = 0.001
  lr_period_epochs: int = 0
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 3e-4
  l2_form: str = 'half_sum_sq'
  decay_before_clip: bool = False
  grad_clip: float = 5.0
  drop_path_step_offset: int = 1
  normalization: str = 'mean_std'
  pad: int = 4
  cutout: int = 0
  score: str = 'last'
  eval_every_epochs: int = 0
  checkpoint_every_steps: int = 0
  log_every_steps: int = 100

  def __post_init__(self):
    if self.score not in SCORES:
      raise ValueError(f'score = {self.score!r}; choose one of {SCORES}')
    if self.normalization not in augment.NORMALIZATIONS:
      raise ValueError(f'normalization = {self.normalization!r}; choose one of '
                       f'{augment.NORMALIZATIONS}')
    if self.l2_form not in final.L2_FORMS:
      raise ValueError(f'l2_form = {self.l2_form!r}; choose one of {final.L2_FORMS}')
    for name in ('layers', 'channels', 'epochs', 'batch_size', 'eval_batch_size',
                 'log_every_steps'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    for name in ('lr_period_epochs', 'eval_every_epochs', 'checkpoint_every_steps', 'cutout',
                 'pad'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0, got {getattr(self, name)}')
    if self.channels % 2:
      raise ValueError(f'channels = {self.channels}: factorized reductions need an even number')

  def network_config(self, num_classes: int) -> network_lib.NetworkConfig:
    return network_lib.NetworkConfig(
        layers=self.layers, channels=self.channels, num_classes=num_classes,
        stem_multiplier=self.stem_multiplier, use_aux_head=self.use_aux_head,
        drop_path_keep=self.drop_path_keep, dropout_keep=self.dropout_keep,
        drop_path_identity=self.drop_path_identity)


def config_from_dict(values: dict[str, Any] | None, name: str) -> StandaloneConfig:
  """``StandaloneConfig(**values)`` with a one-line error naming the config section."""
  values = dict(values or {})
  known = {f.name for f in dataclasses.fields(StandaloneConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f'unknown {name} config key(s) {unknown}; known: {sorted(known)}')
  try:
    return StandaloneConfig(**values)
  except ValueError as e:
    raise ValueError(f'{name}.{e}') from None


class State(NamedTuple):
  """``train``: ``train.TrainState``; ``rng``: typed key (step ``s`` uses ``fold_in(rng, s)``)."""
  train: train_lib.TrainState
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Program:
  """The jitted pieces of one candidate's training (built once per architecture and recipe)."""
  network: network_lib.FixedNetwork
  steps_per_epoch: int
  total_steps: int
  schedule: optax.Schedule
  init: Callable[[jax.Array], State]
  train_step: Callable[..., tuple[State, dict[str, jax.Array]]]
  eval_step: Callable[..., dict[str, jax.Array]]


def lr_schedule(cfg: StandaloneConfig, steps_per_epoch: int) -> optax.Schedule:
  """Per-step learning rate, constant within an epoch (PT ``CosineAnnealingLR`` per epoch)."""
  period = cfg.lr_period_epochs or cfg.epochs

  def schedule(count):
    xp = jnp if isinstance(count, jax.Array) else np
    epoch = xp.minimum(xp.asarray(count) // steps_per_epoch, cfg.epochs - 1)
    return final.sgdr_lr(epoch, cfg.lr_max, cfg.lr_min, period, 1)
  return schedule


def build_program(space: SearchSpace, arch: np.ndarray, cfg: StandaloneConfig, num_classes: int,
                  num_train: int, mean: np.ndarray, std: np.ndarray) -> Program:
  """The candidate's network, schedule and jitted functions (cached on their arguments)."""
  arch = np.asarray(space.validate(arch), np.int32)
  return _build_program(space, arch.tobytes(), cfg, num_classes, num_train,
                        tuple(float(v) for v in mean), tuple(float(v) for v in std))


@functools.lru_cache(maxsize=8)
def _build_program(space, arch_bytes, cfg, num_classes, num_train, mean, std) -> Program:
  arch = np.frombuffer(arch_bytes, np.int32).reshape(space.arch_shape)
  network = network_lib.FixedNetwork(space, arch, cfg.network_config(num_classes))
  steps_per_epoch = num_train // cfg.batch_size
  total_steps = steps_per_epoch * cfg.epochs
  schedule = lr_schedule(cfg, steps_per_epoch)
  optimizer = final.make_optimizer(cfg, schedule)
  step_fn = train_lib.make_train_step(network, optimizer, total_steps=total_steps,
                                      aux_weight=cfg.aux_weight, jit=False)
  mean_a, std_a = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  def init(key: jax.Array) -> State:
    init_key, rng = jax.random.split(key)
    return State(train_lib.create_train_state(network, optimizer, init_key), rng)

  def train_step(state: State, images_u8: jax.Array,
                 labels: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One step: ``images_u8 uint8[B, H, W, 3]``, ``labels int32[B]``; ``state`` donated.

    Metrics: ``loss`` (CE + aux, no L2), ``ce``, ``aux_ce``, ``accuracy`` (augmented batch),
    ``grad_norm`` (before clipping), ``lr``.
    """
    step = state.train.step
    k_aug, k_net = jax.random.split(jax.random.fold_in(state.rng, step))
    images = augment.augment_train(images_u8, k_aug, cutout=cfg.cutout or None,
                                   normalization=cfg.normalization, mean=mean_a, std=std_a,
                                   pad=cfg.pad)
    new_train, metrics = step_fn(state.train, images, labels, k_net,
                                 step + cfg.drop_path_step_offset)
    metrics['lr'] = schedule(step)
    return State(new_train, state.rng), metrics

  def eval_step(params, batch_stats, images_u8: jax.Array, labels: jax.Array,
                mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over one dev batch (BN in inference mode): ``{'correct', 'loss_sum', 'count'}``."""
    images = augment.preprocess_eval(images_u8, cfg.normalization, mean_a, std_a)
    logits, _, _ = network.apply(params, batch_stats, images, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {'correct': jnp.sum(correct * mask), 'loss_sum': jnp.sum(ce * mask),
            'count': jnp.sum(mask)}

  return Program(network=network, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                 schedule=schedule, init=jax.jit(init),
                 train_step=jax.jit(train_step, donate_argnums=0), eval_step=jax.jit(eval_step))


def evaluate(program: Program, state: State, images: np.ndarray, labels: np.ndarray,
             batch_size: int, device: jax.Device) -> dict[str, float]:
  """Accuracy and mean cross-entropy over a whole split: ``{'accuracy', 'loss'}``."""
  pending = []
  for start in range(0, len(images), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    mask = np.ones(batch_size, np.float32)
    if len(x) < batch_size:  # pad the last batch: one program for every batch
      pad = batch_size - len(x)
      mask[len(x):] = 0.0
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
    x, y, mask = jax.device_put((x, y, mask), device)
    pending.append(program.eval_step(state.train.params, state.train.batch_stats, x, y, mask))
  totals = np.zeros(3, np.float64)
  for out in jax.device_get(pending):
    totals += [out['correct'], out['loss_sum'], out['count']]
  correct, loss_sum, count = totals
  return {'accuracy': float(correct / count), 'loss': float(loss_sum / count)}


def _restore(checkpointer: RunCheckpointer | LocalCheckpointer, step: int, program: Program,
             seed: int, device: jax.Device) -> tuple[State, dict]:
  """Restores straight onto ``device`` (no initialisation first)."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = jax.eval_shape(program.init, jax.random.key(seed))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract)
  # A concrete key makes the checkpointer rebuild a typed key from the stored key data.
  template = abstract._replace(rng=jax.random.key(seed))
  state, meta = checkpointer.restore(step, template)
  return jax.device_put(state, device), meta


def finished_result(workdir: str | None) -> dict | None:
  """The ``result.json`` of a finished training in ``workdir``, or None."""
  if workdir is None:
    return None
  path = os.path.join(workdir, 'result.json')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def train_candidate(space: SearchSpace, arch: np.ndarray, cfg: StandaloneConfig,
                    data: SearchData, workdir: str | None, *, seed: int = 0,
                    device: jax.Device | None = None, tag: str = '',
                    stop_after_steps: int | None = None,
                    process_local: bool = False) -> dict[str, Any] | None:
  """Trains ``arch`` on ``data.x_train`` and scores it on ``data.x_valid`` (or resumes).

  Args:
    space: the architecture's CNN space.
    arch: ``int32[2, 5, 4]``.
    cfg: network and recipe.
    data: the search's split (``x_train`` trains, ``x_valid`` scores).
    workdir: this candidate's directory (checkpoints, ``result.json``); None: nothing is saved.
    seed: initialisation, data order, augmentation, drop-path and dropout.
    device: where to train, a device of this process (default: its first local device).
    tag: prefix of the log lines (e.g. ``'candidate 3'``).
    stop_after_steps: stop after this global step with a checkpoint and return None (training
      in slices; a later call continues).
    process_local: only this process trains the candidate (the scratch evaluator spreads
      candidates over the processes of a multi-process run): its checkpoints
      (``checkpoint.LocalCheckpointer``, ``checkpoints/step_<n>``) and ``result.json`` are
      written by this process alone. False: in a multi-process run every process trains it (the
      same numbers) and saves with Orbax collectively (``checkpoints/<n>``), and only the
      primary process writes ``result.json``.

  Returns:
    ``{'score', 'score_kind', 'valid_accuracy' (float per evaluation), 'eval_epochs',
    'last_accuracy', 'best_accuracy', 'best_epoch', 'train_loss', 'epochs', 'steps',
    'params', 'cost' (training seconds, summed over resumes), 'arch'}``; None after a
    ``stop_after_steps`` stop.

  Raises:
    FloatingPointError: a non-finite training loss (the newest checkpoint is the last good one).
    ValueError: a checkpoint of a different data size in ``workdir``.
  """
  done = finished_result(workdir)
  if done is not None:
    return done
  device = device or jax.local_devices()[0]
  started = time.time()
  program = build_program(space, arch, cfg, data.num_classes, len(data.x_train), data.mean,
                          data.std)
  spe, total = program.steps_per_epoch, program.total_steps
  if spe < 1:
    raise ValueError(f'{len(data.x_train)} training images cannot fill one batch of '
                     f'{cfg.batch_size}')
  batcher = final.EpochBatcher(len(data.x_train), cfg.batch_size, seed)
  checkpointer = None
  if workdir is not None:
    checkpointer = (LocalCheckpointer(workdir, max_to_keep=1) if process_local
                    else RunCheckpointer(workdir, max_to_keep=1))
  latest = None if checkpointer is None else checkpointer.latest_step()
  evals: list[dict[str, Any]] = []
  losses: list[float] = []  # mean training loss of each fetch window
  wall_before = 0.0
  if latest is not None:
    state, meta = _restore(checkpointer, latest, program, seed, device)
    if (meta['steps_per_epoch'], meta['num_train']) != (spe, len(data.x_train)):
      checkpointer.close()
      raise ValueError(f'{workdir}: checkpoint of {meta["num_train"]} training images and '
                       f'{meta["steps_per_epoch"]} steps per epoch; now {len(data.x_train)} and '
                       f'{spe}')
    evals, wall_before = list(meta['evals']), float(meta['wall_s'])
    if meta.get('train_loss') is not None:
      losses.append(float(meta['train_loss']))
    logging.info('%s: resuming at step %d of %d', tag or workdir, latest, total)
  else:
    with jax.default_device(device):
      state = program.init(jax.random.key(seed))
    # Committed to the device, as the states the steps return: the first step then reuses their
    # compiled program instead of compiling its own (one train_step compile per candidate).
    state = jax.device_put(state, device)
    latest = 0
  stop = total if stop_after_steps is None else min(total, stop_after_steps)
  counts = network_lib.parameter_counts(program.network)

  def save(step: int) -> None:
    if checkpointer is None or checkpointer.latest_step() == step:
      return
    checkpointer.save(step, state, {
        'step': step, 'steps_per_epoch': spe, 'num_train': len(data.x_train), 'evals': evals,
        'train_loss': losses[-1] if losses else None,
        'wall_s': wall_before + time.time() - started})

  pending: list[dict[str, jax.Array]] = []

  def flush(step: int) -> None:
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    for m in fetched:
      if not math.isfinite(float(m['loss'])):
        raise FloatingPointError(
            f'{tag or "candidate"}: training diverged (loss {float(m["loss"])}) near step {step}; '
            f'lower the learning rate')
    losses.append(float(np.mean([m['loss'] for m in fetched])))
    logging.info('%s: step %d/%d epoch %d loss %.4f acc %.4f lr %.5f', tag or 'candidate', step,
                 total, step // spe, losses[-1], float(np.mean([m['accuracy'] for m in fetched])),
                 float(fetched[-1]['lr']))

  try:
    for step in range(latest, stop):
      rows = batcher.indices(step)
      images, labels = jax.device_put((data.x_train[rows], data.y_train[rows]), device)
      state, metrics = program.train_step(state, images, labels)
      pending.append(metrics)
      done_steps = step + 1
      epoch_end = done_steps % spe == 0
      epoch = done_steps // spe
      if done_steps % cfg.log_every_steps == 0 or epoch_end:
        flush(done_steps)
      if epoch_end and (epoch == cfg.epochs or (cfg.eval_every_epochs
                                                and epoch % cfg.eval_every_epochs == 0)):
        result = evaluate(program, state, data.x_valid, data.y_valid, cfg.eval_batch_size,
                          device)
        evals.append(dict(result, epoch=epoch))
        logging.info('%s: epoch %d dev accuracy %.4f', tag or 'candidate', epoch,
                     result['accuracy'])
      if epoch_end or (cfg.checkpoint_every_steps
                       and done_steps % cfg.checkpoint_every_steps == 0) or done_steps == stop:
        flush(done_steps)
        save(done_steps)
  finally:
    if checkpointer is not None:
      checkpointer.close()
  if stop < total:
    return None
  accuracies = [e['accuracy'] for e in evals]
  best = int(np.argmax(accuracies))
  result = {
      'score': accuracies[best] if cfg.score == 'best' else accuracies[-1],
      'score_kind': f'{cfg.score}_valid_accuracy',
      'valid_accuracy': accuracies, 'eval_epochs': [e['epoch'] for e in evals],
      'last_accuracy': accuracies[-1], 'best_accuracy': accuracies[best],
      'best_epoch': evals[best]['epoch'],
      'train_loss': losses[-1] if losses else None,
      'epochs': cfg.epochs, 'steps': total, 'params': counts['total'],
      'cost': wall_before + time.time() - started, 'arch': space.format(arch),
  }
  if workdir is not None and (process_local or parallel.is_primary()):
    write_json_atomic(os.path.join(workdir, 'result.json'), result)
  return result


def candidate_dir(root: str | None, space: SearchSpace, arch: np.ndarray) -> str | None:
  """``<root>/<12 hex digits of the architecture's string>`` (None without a root)."""
  if root is None:
    return None
  text = f'{space.name}:{space.format(arch)}'
  return os.path.join(root, hashlib.sha1(text.encode()).hexdigest()[:12])


__all__ = ['StandaloneConfig', 'config_from_dict', 'State', 'Program', 'build_program',
           'lr_schedule', 'evaluate', 'train_candidate', 'finished_result', 'candidate_dir',
           'SCORES']
