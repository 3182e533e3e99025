"""Training the controller on (architecture tokens, normalised score) pairs (spec §3.4, §3.5).

The whole training run is one compiled program: a ``lax.fori_loop`` over epochs (with a traced
epoch count) of a ``lax.scan`` over minibatches. The pool is padded to a fixed ``capacity`` with
a validity mask, so pools of any size up to the capacity share one compilation; padded
minibatches are skipped with ``lax.cond`` (an Adam step on an all-padding batch would still move
the parameters through the moments).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import scipy.stats

from nao_jax.controller.config import ControllerConfig
from nao_jax.controller.model import Controller
from nao_jax.spaces.base import SOS

Array = jax.Array


class ControllerState(NamedTuple):
  """Everything that changes while the controller trains.

  Attributes:
    params: the controller's parameter tree.
    opt_state: optax state.
    step: int32 scalar, minibatch updates so far (folds into the dropout RNG).
  """
  params: Any
  opt_state: Any
  step: Array


def normalize_targets(scores, higher_is_better: bool, orientation: str = 'native',
                      transform: str = 'minmax'):
  """Min-max normalises pool scores to [0, 1] and says which way the predictor should move.

  Args:
    scores: ``float[N]`` raw scores of the pool (accuracy, error, perplexity, ...).
    higher_is_better: whether larger raw scores are better.
    orientation: ``'native'`` (normalise the raw score, as every official code base does),
      ``'error'`` (make larger = worse first) or ``'accuracy'`` (make larger = better first).
    transform: ``'minmax'`` (official) or ``'rank'`` (average ranks scaled to [0, 1]).

  Returns:
    ``(targets float32[N], direction)``: ``direction`` is +1 when larger targets are better
    (step along +grad) and -1 otherwise. When all scores are equal the targets are all 0.5 (the
    official code divides by zero there).

  Raises:
    ValueError: for an empty pool or a non-finite score.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(f'scores must be a non-empty 1-D array, got shape {scores.shape}')
  if not np.all(np.isfinite(scores)):
    bad = int(np.flatnonzero(~np.isfinite(scores))[0])
    raise ValueError(f'score {bad} is {scores[bad]}; scores must be finite')
  larger_is_better = higher_is_better
  if orientation == 'error' and higher_is_better or orientation == 'accuracy' and not higher_is_better:
    scores, larger_is_better = -scores, not higher_is_better
  elif orientation not in ('native', 'error', 'accuracy'):
    raise ValueError(f"orientation must be 'native', 'error' or 'accuracy', got {orientation!r}")
  if transform == 'rank':
    scores = scipy.stats.rankdata(scores)
  elif transform != 'minmax':
    raise ValueError(f"transform must be 'minmax' or 'rank', got {transform!r}")
  low, high = scores.min(), scores.max()
  if high == low:
    targets = np.full(scores.shape, 0.5)
  else:
    targets = (scores - low) / (high - low)
  return targets.astype(np.float32), (1 if larger_is_better else -1)


def make_optimizer(cfg: ControllerConfig) -> optax.GradientTransformation:
  """Adam with classical (coupled) L2 and global-norm clipping, as the official code."""
  chain = [optax.clip_by_global_norm(cfg.grad_clip)]
  if cfg.l2_mode == 'adam_coupled' and cfg.l2 > 0:
    chain.append(optax.add_decayed_weights(cfg.l2))  # PT Adam weight_decay: after clipping
  chain += [optax.scale_by_adam(), optax.scale(-cfg.lr)]
  return optax.chain(*chain)


@functools.partial(jax.jit, static_argnames=('cfg',))
def init_controller(cfg: ControllerConfig, key: Array) -> ControllerState:
  """Fresh parameters and optimizer state (one compilation per config)."""
  model = Controller(cfg)
  dummy = jnp.zeros((1, cfg.source_length), jnp.int32)
  params = model.init(key, dummy, dummy)['params']
  return ControllerState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=('cfg',))
def reset_optimizer(cfg: ControllerConfig, state: ControllerState) -> ControllerState:
  """Keeps the parameters and starts a fresh Adam (PT-V1 between search rounds)."""
  return ControllerState(state.params, make_optimizer(cfg).init(state.params), state.step)


def decoder_inputs(targets: Array) -> Array:
  """Teacher-forcing inputs ``[SOS, y_1, ..., y_{L-1}]`` for targets ``int32[B, L]``."""
  return jnp.concatenate([jnp.full_like(targets[:, :1], SOS), targets[:, :-1]], axis=1)


def loss_fn(params, cfg: ControllerConfig, tokens: Array, targets: Array, weights: Array,
            rng: Array, train: bool = True):
  """``trade_off * MSE + (1 - trade_off) * CE`` over the real (weight 1) rows of a batch.

  Args:
    tokens: ``int32[B, L]`` (already augmented) architectures, also the decoder targets.
    targets: ``float32[B]`` normalised scores; NaN for unlabeled rows (reconstruction only).
    weights: ``float32[B]``, 1 for real rows and 0 for padding.

  Returns:
    ``(loss, (mse, ce))``; with ``l2_mode='loss'`` the loss includes ``l2 * sum(w^2) / 2``.
  """
  predictions, logits = Controller(cfg).apply(
      {'params': params}, tokens, decoder_inputs(tokens), train, rngs={'dropout': rng})
  # NaN targets mark unlabeled rows: they train reconstruction only (TF's target -1, spec §3.4).
  labeled = weights * jnp.isfinite(targets)
  errors = jnp.where(labeled > 0, predictions - jnp.nan_to_num(targets), 0.0)
  mse = jnp.sum(labeled * errors ** 2) / jnp.maximum(labeled.sum(), 1.0)
  token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean(axis=1)
  ce = jnp.sum(weights * token_ce) / jnp.maximum(weights.sum(), 1.0)
  loss = cfg.trade_off * mse + (1.0 - cfg.trade_off) * ce
  if cfg.l2_mode == 'loss' and cfg.l2 > 0:
    loss += 0.5 * cfg.l2 * sum(jnp.sum(p * p) for p in jax.tree.leaves(params))
  return loss, (mse, ce)


def pad_pool(tokens: np.ndarray, targets: np.ndarray, capacity: int):
  """Pads a pool to ``capacity`` rows; returns ``(tokens, targets, valid)`` numpy arrays."""
  n = len(tokens)
  if n == 0:
    raise ValueError('cannot train the controller on an empty pool')
  if n > capacity:
    raise ValueError(f'pool of {n} architectures exceeds the controller capacity {capacity}')
  pad = capacity - n
  return (np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), np.int32)]).astype(np.int32),
          np.concatenate([targets, np.zeros(pad, np.float32)]).astype(np.float32),
          np.concatenate([np.ones(n, bool), np.zeros(pad, bool)]))


@functools.partial(jax.jit, static_argnames=('cfg', 'mesh'), donate_argnames=('state',))
def train_epochs(state: ControllerState, cfg: ControllerConfig, tokens: Array, targets: Array,
                 valid: Array, swaps: Array, num_epochs: Array, key: Array, mesh=None):
  """Trains for ``num_epochs`` epochs over a padded pool.

  Each epoch shuffles the real rows (padding goes last), draws one branch-swap permutation per
  row (when ``cfg.swap_augment``), and steps through minibatches of ``cfg.batch_size``; the last
  real minibatch may be partial (as a PyTorch DataLoader without ``drop_last``).

  Args:
    state: the controller state (donated).
    cfg: static controller config.
    tokens: ``int32[C, L]`` padded pool; ``C`` must be a multiple of ``cfg.batch_size``.
    targets: ``float32[C]`` normalised scores.
    valid: ``bool[C]`` real rows.
    swaps: ``int32[P, L]`` branch-swap permutations of the space.
    num_epochs: int32 scalar (traced: any count reuses the compilation).
    key: PRNG key for shuffling, augmentation and dropout.
    mesh: optional ``jax.sharding.Mesh`` with a ``'data'`` axis: every minibatch is split over
      it (data parallel; ``cfg.batch_size`` must divide evenly) and the state is replicated.

  Returns:
    ``(state, metrics)`` with the mean loss / mse / ce of the last epoch's real minibatches.
  """
  capacity, batch = tokens.shape[0], cfg.batch_size
  num_batches = capacity // batch
  if mesh is not None and batch % mesh.shape['data']:
    raise ValueError(f'controller.batch_size {batch} does not split over '
                     f'{mesh.shape["data"]} devices')
  optimizer = make_optimizer(cfg)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  shuffle_key, dropout_key = jax.random.split(key)

  def update(state, batch_tokens, batch_targets, batch_weights):
    rng = jax.random.fold_in(dropout_key, state.step)
    (loss, (mse, ce)), grads = grad_fn(state.params, cfg, batch_tokens, batch_targets,
                                       batch_weights, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return ControllerState(params, opt_state, state.step + 1), jnp.stack([loss, mse, ce])

  def epoch(index, carry):
    state, _ = carry
    epoch_key = jax.random.fold_in(shuffle_key, index)
    order_key, swap_key = jax.random.split(epoch_key)
    order = jnp.argsort(jnp.where(valid, jax.random.uniform(order_key, (capacity,)), 2.0))
    pool = tokens[order]
    if cfg.swap_augment:
      choice = jax.random.randint(swap_key, (capacity,), 0, swaps.shape[0])
      pool = jnp.take_along_axis(pool, swaps[choice], axis=1)
    batches = (pool.reshape(num_batches, batch, -1), targets[order].reshape(num_batches, batch),
               valid[order].astype(jnp.float32).reshape(num_batches, batch))

    def minibatch(state, xs):
      if mesh is not None:
        xs = jax.lax.with_sharding_constraint(xs, NamedSharding(mesh, P('data')))
      batch_tokens, batch_targets, batch_weights = xs
      real = batch_weights.sum() > 0
      state, stats = jax.lax.cond(real, update, lambda s, *_: (s, jnp.zeros(3)),
                                  state, batch_tokens, batch_targets, batch_weights)
      return state, stats * batch_weights.sum()

    state, stats = jax.lax.scan(minibatch, state, batches)
    return state, stats.sum(0) / jnp.maximum(valid.sum(), 1)

  state, stats = jax.lax.fori_loop(0, num_epochs, epoch, (state, jnp.zeros(3)))
  return state, {'loss': stats[0], 'mse': stats[1], 'ce': stats[2]}


def capacity_for(pool_size: int, batch_size: int) -> int:
  """Smallest multiple of ``batch_size`` holding ``pool_size`` rows."""
  return max(1, math.ceil(pool_size / batch_size)) * batch_size


@functools.partial(jax.jit, static_argnames=('cfg',))
def predict_scores(params, cfg: ControllerConfig, tokens: Array) -> Array:
  """Predicted normalised scores ``float32[B]`` for ``int32[B, L]`` tokens (eval mode)."""
  model = Controller(cfg)
  return model.apply({'params': params}, tokens,
                     method=lambda m, t: m.predict(m.encode(t)[1]))


def predict_in_chunks(params, cfg: ControllerConfig, tokens: np.ndarray,
                      chunk: int = 256) -> np.ndarray:
  """``predict_scores`` over any number of rows with one compilation (fixed-size chunks)."""
  tokens = np.asarray(tokens, np.int32)
  n = len(tokens)
  padded = np.concatenate([tokens, np.zeros((-n % chunk, tokens.shape[1]), np.int32)])
  outputs = [np.asarray(predict_scores(params, cfg, jnp.asarray(padded[i:i + chunk])))
             for i in range(0, len(padded), chunk)]
  return np.concatenate(outputs)[:n] if outputs else np.zeros(0, np.float32)


@functools.partial(jax.jit, static_argnames=('cfg',))
def reconstruct(params, cfg: ControllerConfig, tokens: Array, mask_table: Array) -> Array:
  """Greedy masked decoding of the un-moved embeddings of ``int32[B, L]`` tokens."""
  def run(model, t):
    memory, embedding = model.encode(t)
    return model.decode_greedy(memory, embedding, mask_table)
  return Controller(cfg).apply({'params': params}, tokens, method=run)
