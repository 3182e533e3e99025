"""Training and scoring of the weight-sharing supernet (PT-V1 ``train_search.py``, spec §5.2).

* ``make_train_step``: ``train_step(state, images, labels, arch, rng) -> (state, metrics)``, one
  architecture (``int32[2, 5, 4]``, traced) per step; PT-V1's recipe: cross-entropy, gradients
  clipped to global norm 5, coupled L2 3e-4 added after clipping, SGD momentum 0.9, learning
  rate cosine per epoch 0.025 -> 0.001 over 150 epochs (``cosine_per_epoch``), drop-path keep 0.9
  scheduled over ``ceil(45000 / 64) * 150`` steps.
* ``make_score_fn``: accuracy of many architectures with the shared weights, each on its own
  batch of validation images (PT: 500), BN in training mode (batch statistics), dropout and
  drop-path off, in one compiled program.
* ``sampling_probabilities``: uniform over the pool (PT-V1), or proportional to the parameter
  count of each architecture's stand-alone N=3, C=20 network (NAO-V2 "balanced" sampling;
  TF-WS ``child_sample_policy=params``).

Optimizer note: PyTorch's SGD skips parameters whose ``.grad`` is None. PT-V1 zeroes gradients
in place (``zero_grad()`` of that era keeps the tensors), so every parameter that was used once
gets weight decay and momentum at every later step; the optax chain here updates every parameter
from step 0, which differs only for weights no sampled architecture has touched yet.

Data parallelism: pass ``data_sharding`` (e.g. ``NamedSharding(auto_mesh(mesh), P('data'))``)
and the batch is constrained to it inside the step while the architecture and the state stay
replicated, so every device runs the same architecture on its shard; BatchNorm then uses the
statistics of the global batch (XLA inserts the all-reduce). Checked by hand on 2 forced host
devices: the evaluator's parameters after a round and its scores equal the single-device ones
(max |diff| 2e-7); not part of the test suite (a second compilation of the training step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from nao_jax.cnn import network as network_lib
from nao_jax.cnn.supernet import Supernet, SupernetConfig
from nao_jax.spaces import WS_SPACE
from nao_jax.spaces.base import SearchSpace

Params = dict[str, Any]
SAMPLE_POLICIES = ('uniform', 'params')


class SupernetState(NamedTuple):
  """Everything a supernet training step updates.

  Attributes:
    step: ``int32[]`` steps taken (drives the drop-path schedule; the learning rate follows the
      optimizer's own count, which equals it unless a schedule is restarted).
    params: shared weights (``Supernet.init`` layout).
    batch_stats: BatchNorm running statistics (same layout, ``{'mean', 'var'}`` leaves).
    opt_state: optax state of ``make_optimizer``'s transformation.
  """
  step: jax.Array
  params: Params
  batch_stats: Params
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """PT-V1 supernet training recipe (``NAO_V1/train_search.py`` defaults).

  Attributes:
    batch_size: images per step (one architecture per step).
    epochs: length of the cosine and drop-path schedules, in epochs.
    train_size: images in the training split (45k of the 90/10 split).
    lr_max, lr_min: cosine annealing per epoch from ``lr_max`` to ``lr_min``.
    momentum: SGD momentum (no Nesterov).
    weight_decay: coupled L2 (added to the clipped gradient, as PT's SGD does).
    clip_norm: global-norm gradient clipping; None disables it (TF-WS's ineffective clip).
    drop_last: drop the last, partial batch of an epoch. A jitted step needs one batch shape;
      PT (``drop_last=False``) runs a partial batch of ``train_size % batch_size`` (8) images.
      With False, the partial batch is filled up with the first images of the same epoch
      order, so every epoch still has ``ceil(train_size / batch_size)`` steps as in PT.
  """
  batch_size: int = 64
  epochs: int = 150
  train_size: int = 45_000
  lr_max: float = 0.025
  lr_min: float = 0.001
  momentum: float = 0.9
  weight_decay: float = 3e-4
  clip_norm: float | None = 5.0
  drop_last: bool = False

  @property
  def steps_per_epoch(self) -> int:
    if self.drop_last:
      return self.train_size // self.batch_size
    return math.ceil(self.train_size / self.batch_size)

  @property
  def total_steps(self) -> int:
    """Steps of the whole schedule (PT: drop-path ``steps = len(train_queue) * epochs``)."""
    return self.steps_per_epoch * self.epochs


def cosine_per_epoch(lr_max: float, lr_min: float, epochs: int,
                     steps_per_epoch: int) -> optax.Schedule:
  """PT ``CosineAnnealingLR(T_max=epochs, eta_min=lr_min)`` stepped once per epoch.

  ``lr(e) = lr_min + (lr_max - lr_min) * (1 + cos(pi * e / epochs)) / 2`` for epoch
  ``e = count // steps_per_epoch``, constant within an epoch (epoch 0 runs at ``lr_max``).
  """
  def schedule(count):
    # numpy for host integers (logging without device work), jnp for traced counts.
    xp = jnp if isinstance(count, jax.Array) else np
    epoch = xp.minimum(count // steps_per_epoch, epochs).astype(xp.float32)
    return lr_min + (lr_max - lr_min) * 0.5 * (1.0 + xp.cos(np.pi * epoch / epochs))
  return schedule


def make_optimizer(config: TrainConfig = TrainConfig(),
                   learning_rate: float | optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """PT ``clip_grad_norm_(5)`` then ``SGD(lr, momentum=0.9, weight_decay=3e-4)``.

  Args:
    config: the recipe.
    learning_rate: overrides the per-epoch cosine of ``config``.
  """
  if learning_rate is None:
    learning_rate = cosine_per_epoch(config.lr_max, config.lr_min, config.epochs,
                                     config.steps_per_epoch)
  parts = [] if config.clip_norm is None else [optax.clip_by_global_norm(config.clip_norm)]
  parts += [optax.add_decayed_weights(config.weight_decay),
            optax.sgd(learning_rate, momentum=config.momentum)]
  return optax.chain(*parts)


def create_state(supernet: Supernet, optimizer: optax.GradientTransformation,
                 key: jax.Array) -> SupernetState:
  """Initialises shared weights, statistics and optimizer state."""
  params, batch_stats = supernet.init(key)
  return SupernetState(jnp.zeros((), jnp.int32), params, batch_stats, optimizer.init(params))


def _constrain(x: jax.Array, sharding) -> jax.Array:
  return x if sharding is None else lax.with_sharding_constraint(x, sharding)


def auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """``mesh`` with every axis of type Auto (compiler-propagated shardings).

  The step functions constrain only the batch and let XLA propagate the rest (GSPMD); with
  Explicit axes (``jax.make_mesh``'s default in current JAX) every intermediate, e.g. each
  ``lax.switch`` branch's output, would need a matching explicit sharding.
  """
  auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def make_train_step(supernet: Supernet, optimizer: optax.GradientTransformation, *,
                    total_steps: int, restart_every: int | None = None,
                    data_sharding: jax.sharding.Sharding | None = None, jit: bool = True
                    ) -> Callable[..., tuple[SupernetState, dict[str, jax.Array]]]:
  """Builds ``train_step(state, images, labels, arch, rng) -> (state, metrics)``.

  The returned function is jitted with ``state`` donated (do not use the old state after the
  call); the architecture is an argument, so every architecture runs the same executable.

  Args:
    supernet: the supernet (its config sets drop-path and dropout).
    optimizer: e.g. ``make_optimizer(config)``.
    total_steps: drop-path schedule length; PT-V1 uses ``r_step = (step + 1) / total_steps``.
    restart_every: restart the drop-path ramp every this many steps (NAO-V2's per-round
      schedule), or None.
    data_sharding: sharding of the batch axis (data parallelism), or None.
    jit: return the jitted, donating function (False: the plain function, for tracing).

  The step's arguments: ``images float32[B, H, W, 3]`` (augmented, normalised), ``labels
  int32[B]``, ``arch int32[2, 5, 4]``, ``rng`` a key (drop-path and dropout masks). Metrics
  (scalars, in-graph): ``loss`` (cross-entropy, without L2), ``accuracy`` (top-1 on the batch),
  ``grad_norm`` (before clipping).
  """

  def train_step(state: SupernetState, images: jax.Array, labels: jax.Array, arch: jax.Array,
                 rng: jax.Array) -> tuple[SupernetState, dict[str, jax.Array]]:
    images, labels = _constrain(images, data_sharding), _constrain(labels, data_sharding)
    step = state.step if restart_every is None else state.step % restart_every
    progress = network_lib.drop_path_progress(step + 1, total_steps)

    def loss_fn(params):
      logits, batch_stats = supernet.apply(params, state.batch_stats, images, arch, train=True,
                                           rng=rng, drop_path_progress=progress)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
      return loss, (batch_stats, {'loss': loss, 'accuracy': accuracy})

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics['grad_norm'] = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return SupernetState(state.step + 1, params, batch_stats, opt_state), metrics

  return jax.jit(train_step, donate_argnums=0) if jit else train_step


def make_score_fn(supernet: Supernet, *, keep_bn_updates: bool = True,
                  data_sharding: jax.sharding.Sharding | None = None,
                  jit: bool = True) -> Callable[..., tuple[jax.Array, Params]]:
  """Builds ``score(params, batch_stats, archs, images, labels, indices, count)``.

  Architecture ``p < count`` is run on ``images[indices[p]]`` with BN in training mode (batch
  statistics; PT ``bn_train=True``), dropout and drop-path off, and scored by top-1 accuracy.
  The architectures run one after another in one loop of the compiled program (a
  ``lax.fori_loop`` whose trip count is the traced ``count``: like ``lax.map`` over the stacked
  architectures, but padding the arrays to a fixed capacity costs no compute, so one
  compilation serves every pool size up to the capacity). Mapping sequentially rather than
  vmapping keeps ``lax.switch`` a real branch (see ``supernet.DISPATCH_NOTES``).

  Args:
    supernet: the supernet.
    keep_bn_updates: thread the running statistics through the loop and return them updated, as
      PT's ``bn_train`` scoring does (the scores never depend on them); False returns them
      unchanged.
    data_sharding: sharding of each scoring batch (data parallelism), or None.
    jit: return the jitted function.

  The function's arguments: ``archs int32[P, 2, 5, 4]``, ``images float32[N, H, W, 3]``
  (normalised), ``labels int32[N]``, ``indices int32[P, V]`` (the V images of each
  architecture), ``count int32[]`` (architectures ``>= count`` are padding and score 0). Returns
  ``(accuracy float32[P], batch_stats)``.
  """

  def score(params: Params, batch_stats: Params, archs: jax.Array, images: jax.Array,
            labels: jax.Array, indices: jax.Array, count: jax.Array
            ) -> tuple[jax.Array, Params]:
    def body(p, carry):
      accuracy, stats = carry
      idx = indices[p]
      x = _constrain(jnp.take(images, idx, axis=0), data_sharding)
      y = _constrain(jnp.take(labels, idx, axis=0), data_sharding)
      logits, new_stats = supernet.apply(params, stats, x, archs[p], train=True, rng=None)
      acc = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
      return accuracy.at[p].set(acc), (new_stats if keep_bn_updates else stats)

    accuracy = jnp.zeros((archs.shape[0],), jnp.float32)
    return lax.fori_loop(0, count, body, (accuracy, batch_stats))

  return jax.jit(score) if jit else score


# -- shared compiled programs ----------------------------------------------------------------------


def build_train_step(supernet_config: SupernetConfig, train_config: TrainConfig, *,
                     restart_every_epochs: int | None = None,
                     data_sharding: jax.sharding.Sharding | None = None
                     ) -> tuple[Supernet, optax.GradientTransformation, Callable]:
  """``(supernet, optimizer, jitted train_step)`` for a recipe, memoised on its arguments.

  Everything that builds the same recipe in one process (several evaluators, tests) shares one
  jitted function and hence one compilation.

  Args:
    supernet_config: the supernet.
    train_config: the recipe; the learning rate is ``cosine_per_epoch`` over
      ``train_config.epochs`` and drop-path ramps over ``train_config.total_steps``.
    restart_every_epochs: NAO-V2: both schedules restart every this many epochs instead (the
      cosine then spans ``restart_every_epochs``).
    data_sharding: sharding of the batch axis, or None.
  """
  return _build_train_step(supernet_config, train_config, restart_every_epochs, data_sharding)


@functools.lru_cache(maxsize=16)
def _build_train_step(supernet_config, train_config, restart_every_epochs, data_sharding):
  supernet = Supernet(supernet_config)
  spe = train_config.steps_per_epoch
  if restart_every_epochs is None:
    schedule = cosine_per_epoch(train_config.lr_max, train_config.lr_min, train_config.epochs,
                                spe)
    total, restart = train_config.total_steps, None
  else:
    period = restart_every_epochs * spe
    cosine = cosine_per_epoch(train_config.lr_max, train_config.lr_min, restart_every_epochs,
                              spe)
    schedule = lambda count: cosine(count % period)
    total, restart = period, period
  optimizer = make_optimizer(train_config, learning_rate=schedule)
  step = make_train_step(supernet, optimizer, total_steps=total, restart_every=restart,
                         data_sharding=data_sharding)
  return supernet, optimizer, step


def build_score_fn(supernet_config: SupernetConfig, *, keep_bn_updates: bool = True,
                   data_sharding: jax.sharding.Sharding | None = None) -> Callable:
  """The jitted ``make_score_fn`` of a supernet config, memoised (one compilation shared)."""
  return _build_score_fn(supernet_config, keep_bn_updates, data_sharding)


@functools.lru_cache(maxsize=16)
def _build_score_fn(supernet_config, keep_bn_updates, data_sharding):
  return make_score_fn(Supernet(supernet_config), keep_bn_updates=keep_bn_updates,
                       data_sharding=data_sharding)


# -- sampling ---------------------------------------------------------------------------------------

_PARAM_COUNT_CACHE: dict[tuple, int] = {}


def standalone_param_counts(archs: Sequence[np.ndarray] | np.ndarray, *, layers: int = 3,
                            channels: int = 20, num_classes: int = 10,
                            space: SearchSpace = WS_SPACE) -> np.ndarray:
  """Trainable parameters of each architecture's stand-alone network (NAO-V2 balanced sampling).

  NAO-V2 instantiates ``NASNetworkCIFAR(N=3, C=20)`` per architecture and counts its parameters
  without the auxiliary head; here the count is ``jax.eval_shape`` of ``FixedNetwork.init``
  (no allocation), cached per architecture.

  Returns:
    ``int64[P]``.
  """
  counts = []
  for arch in archs:
    arch = np.asarray(arch, np.int32)
    key = (arch.tobytes(), layers, channels, num_classes, space.name)
    if key not in _PARAM_COUNT_CACHE:
      config = network_lib.NetworkConfig(layers=layers, channels=channels,
                                         num_classes=num_classes, use_aux_head=False)
      network = network_lib.FixedNetwork(space, arch, config)
      _PARAM_COUNT_CACHE[key] = network_lib.parameter_counts(network)['without_aux']
    counts.append(_PARAM_COUNT_CACHE[key])
  return np.asarray(counts, np.int64)


def sampling_probabilities(archs: np.ndarray, policy: str = 'uniform', *,
                           param_counts: np.ndarray | None = None, **count_kwargs) -> np.ndarray:
  """Per-step sampling probabilities of the pool's architectures, ``float64[P]``.

  Args:
    archs: ``int32[P, 2, 5, 4]``.
    policy: ``'uniform'`` (PT-V1, TF-WS default) or ``'params'`` (NAO-V2: proportional to the
      stand-alone parameter count).
    param_counts: precomputed counts for ``'params'``; computed with
      ``standalone_param_counts(archs, **count_kwargs)`` otherwise.
  """
  n = len(archs)
  if policy == 'uniform':
    return np.full((n,), 1.0 / n)
  if policy == 'params':
    counts = (standalone_param_counts(archs, **count_kwargs) if param_counts is None
              else np.asarray(param_counts))
    counts = counts.astype(np.float64)
    return counts / counts.sum()
  raise ValueError(f'unknown sampling policy {policy!r}; expected one of {SAMPLE_POLICIES}')


__all__ = ['SupernetState', 'TrainConfig', 'cosine_per_epoch', 'make_optimizer', 'create_state',
           'make_train_step', 'make_score_fn', 'build_train_step', 'build_score_fn',
           'standalone_param_counts', 'auto_mesh',
           'sampling_probabilities', 'SAMPLE_POLICIES']
