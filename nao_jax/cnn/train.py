"""Training state and step for a fixed-architecture CIFAR network (spec §6.5, PT-V1 recipe).

PT-V1 order of operations per step: loss = CE + 0.4 aux CE; gradients clipped to global norm 5;
then ``SGD(momentum=0.9, weight_decay=wd)``, whose weight decay adds ``wd * w`` to the clipped
gradient of every parameter (coupled L2, BN and biases included) before the momentum buffer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nao_jax.cnn import network as network_lib

Params = dict[str, Any]


class TrainState(NamedTuple):
  """Everything a training step updates.

  Attributes:
    step: ``int32[]`` number of steps taken.
    params: trainable parameters (``FixedNetwork.init`` layout).
    batch_stats: BatchNorm running statistics (same layout, ``{'mean', 'var'}`` leaves).
    opt_state: optax state of ``make_optimizer``'s transformation.
  """
  step: jax.Array
  params: Params
  batch_stats: Params
  opt_state: optax.OptState


def make_optimizer(learning_rate: float | optax.Schedule, *, momentum: float = 0.9,
                   weight_decay: float = 3e-4, clip_norm: float | None = 5.0,
                   nesterov: bool = False) -> optax.GradientTransformation:
  """PT ``clip_grad_norm_(5)`` then ``SGD(lr, momentum, weight_decay)``.

  Args:
    learning_rate: constant or an optax schedule of the optimizer's step count.
    momentum: SGD momentum (PT buffer ``b = m b + g``; no dampening).
    weight_decay: coupled L2 coefficient (added to the gradient, after clipping, as PT does).
    clip_norm: global-norm bound; None disables clipping (TF-WS's ineffective clip, spec §9.1).
    nesterov: Nesterov momentum (TF-WS final training).
  """
  parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
  parts += [optax.add_decayed_weights(weight_decay),
            optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)]
  return optax.chain(*parts)


def create_train_state(network: network_lib.FixedNetwork, optimizer: optax.GradientTransformation,
                       key: jax.Array) -> TrainState:
  """Initialises parameters, statistics and optimizer state."""
  # One compiled init instead of hundreds of eagerly dispatched random ops.
  params, batch_stats = jax.jit(network.init)(key)
  return TrainState(jnp.zeros((), jnp.int32), params, batch_stats, optimizer.init(params))


def make_train_step(network: network_lib.FixedNetwork, optimizer: optax.GradientTransformation, *,
                    total_steps: int, aux_weight: float = network_lib.AUX_WEIGHT,
                    jit: bool = True) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Builds ``train_step(state, images, labels, rng, step) -> (state, metrics)``.

  The returned function is jitted with ``state`` donated (its buffers are reused for the new
  state: do not touch the old one after the call).

  Args:
    network: the fixed network (its config sets drop-path / dropout / auxiliary head).
    optimizer: e.g. ``make_optimizer(...)``.
    total_steps: drop-path schedule length; ``r_step = min(1, step / total_steps)``.
    aux_weight: weight of the auxiliary cross-entropy.
    jit: return the jitted, donating function (False: the plain function, for tracing).

  The step's arguments: ``images float32[B, 32, 32, 3]``, ``labels int32[B]``, ``rng`` a key
  (drop-path and dropout masks), ``step`` the drop-path step (PT-V1 passes the global step + 1).
  Metrics (scalars, computed in-graph): ``loss`` (total, without L2), ``ce``, ``aux_ce``,
  ``accuracy`` (top-1 of the main head on this batch), ``grad_norm`` (before clipping).
  """

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array, rng: jax.Array,
                 step) -> tuple[TrainState, dict[str, jax.Array]]:
    progress = network_lib.drop_path_progress(step, total_steps)

    def loss_fn(params):
      logits, aux_logits, batch_stats = network.apply(
          params, state.batch_stats, images, train=True, rng=rng, drop_path_progress=progress)
      loss, parts = network_lib.loss(logits, aux_logits, labels, aux_weight)
      accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
      return loss, (batch_stats, dict(parts, loss=loss, accuracy=accuracy))

    grads, (batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
    metrics['grad_norm'] = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

  return jax.jit(train_step, donate_argnums=0) if jit else train_step
