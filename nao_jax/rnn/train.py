"""Training step and evaluation of the recurrent language model (spec §6.8, §5.3).

The step follows the PyTorch reference order: loss gradient -> clip by global norm (0.25) ->
add ``weight_decay * w`` (PyTorch SGD ``weight_decay``: coupled, not clipped) -> SGD with
``lr * lr_scale``, where the caller passes ``lr_scale = seq_len / bptt`` (times any epoch decay).

**Variable BPTT without recompiling.** The reference draws ``seq_len`` per window (``N(35, 5)``,
sometimes 17.5-based, capped at 55); every distinct window length would be a new compilation.
``pad_window`` pads a window up to a multiple of ``pad_multiple`` and passes the true ``length``
as traced data; padded steps are excluded from the loss, TAR, and the carried state. Cost:
``pad_multiple=5`` (default) wastes at most 4 steps (~2 on average, ~6 % of a 35-step window) and
compiles one program per bucket met: lengths 5..55 give at most 11, and a long run meets them all
(N(35, 5) spans ~15..55 and the half-length draws ~5..30), each compiled once;
``pad_multiple=55`` compiles once but spends ~57 % more compute on a 35-step window.

**NT-ASGD** (optional, the official recipe): host code calls ``nt_asgd_should_switch`` after each
epoch and ``start_averaging`` when it fires; from then on every step also updates the running
mean of the iterates (PyTorch ``ASGD`` with ``t0 = 0, lambd = 0``: same update as SGD), and
``eval_params`` returns the average. Switching changes the state's pytree, so it costs exactly
one recompilation.

Data are time-major ``int32[T, B]`` throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nao_jax import parallel
from nao_jax.data import text
from nao_jax.rnn import model as model_lib

Array = jax.Array
Params = dict


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimiser and regulariser settings (hashable: a jit static arg).

  Attributes:
    lr: base SGD learning rate; 10 is the seed's ENAS setup, 20 the official NAO code, 0.25 the
      WS-RNN supernet.
    clip: max global gradient norm (0.25 final training; 10 in the supernet search).
    weight_decay: L2 coefficient added to the clipped gradient; 5e-7 seed / ENAS (default),
      8e-7 official NAO PTB.
    tar_beta: temporal activation regularisation weight (1e-3).
    ar_alpha: activation regularisation weight (0).
    bptt: base window length that ``lr_scale = seq_len / bptt`` refers to.
  """

  lr: float = 10.0
  clip: float = 0.25
  weight_decay: float = 5e-7
  tar_beta: float = 1e-3
  ar_alpha: float = 0.0
  bptt: int = 35


class TrainState(NamedTuple):
  """Everything a training step changes.

  Attributes:
    step: ``int32[]`` number of steps taken.
    params: model parameters.
    opt_state: optax state of ``make_optimizer`` (empty for plain SGD, kept for generality).
    avg_params: NT-ASGD running mean of the iterates, or None while on plain SGD.
    avg_count: ``int32[]`` number of iterates in ``avg_params``.
  """

  step: Array
  params: Params
  opt_state: optax.OptState
  avg_params: Params | None
  avg_count: Array


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Clip -> coupled weight decay -> SGD at ``lr`` (``lr_scale`` is applied by the step)."""
  return optax.chain(optax.clip_by_global_norm(config.clip),
                     optax.add_decayed_weights(config.weight_decay),
                     optax.scale(-config.lr))


def init_train_state(params: Params, config: TrainConfig) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=make_optimizer(config).init(params), avg_params=None,
                    avg_count=jnp.zeros((), jnp.int32))


# -- NT-ASGD -------------------------------------------------------------------------------------


def nt_asgd_should_switch(previous_losses: Sequence[float], current_loss: float,
                          nonmono: int = 5) -> bool:
  """Non-monotone trigger: more than ``nonmono`` earlier valid losses and the current one is worse
  than the best of all but the last ``nonmono`` of them."""
  return len(previous_losses) > nonmono and current_loss > min(previous_losses[:-nonmono])


def start_averaging(state: TrainState) -> TrainState:
  """Switches to ASGD: the next step starts the running mean (its first iterate replaces it)."""
  return state._replace(avg_params=jax.tree.map(jnp.copy, state.params),
                        avg_count=jnp.zeros((), jnp.int32))


def average_update(avg: Params, params: Params, count: Array) -> tuple[Params, Array]:
  """Adds one iterate to a running mean of ``count`` iterates."""
  count = count + 1
  rate = 1.0 / count.astype(jnp.float32)
  return jax.tree.map(lambda a, p: a + rate * (p - a), avg, params), count


def eval_params(state: TrainState) -> Params:
  """The weights to evaluate: the ASGD average once averaging has started."""
  return state.params if state.avg_params is None else state.avg_params


# -- variable-length windows -------------------------------------------------------------------


def padded_length(seq_len: int, pad_multiple: int = 5) -> int:
  """Bucketed window length: ``seq_len`` rounded up to a multiple of ``pad_multiple``."""
  return pad_multiple * math.ceil(seq_len / pad_multiple)


def pad_window(inputs: np.ndarray, targets: np.ndarray,
               pad_multiple: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads a window ``int[n, B]`` to its bucket; returns ``(inputs, targets, int32[] length)``."""
  n = inputs.shape[0]
  pad = ((0, padded_length(n, pad_multiple) - n), (0, 0))
  return (np.pad(np.asarray(inputs, np.int32), pad), np.pad(np.asarray(targets, np.int32), pad),
          np.asarray(n, np.int32))


# -- steps ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('model_config', 'train_config'),
                   donate_argnames=('state',))
def train_step(state: TrainState, inputs: Array, targets: Array, hidden: Array, rng: Array,
               lr_scale: Array, length: Array | None = None, arch: Array | None = None, *,
               model_config: model_lib.LMConfig,
               train_config: TrainConfig) -> tuple[TrainState, Array, dict]:
  """One SGD step on one BPTT window.

  The state is donated. Compiles once per (window shape, configs); ``length``, ``lr_scale`` and
  the supernet's ``arch`` are data.

  Args:
    state: current ``TrainState``.
    inputs: ``int32[T, B]`` tokens (time-major).
    targets: ``int32[T, B]`` next tokens.
    hidden: ``float32[B, H]`` state carried from the previous window.
    rng: dropout key of this step (e.g. ``fold_in(key, step)``).
    lr_scale: ``float32[]`` multiplies ``train_config.lr``; the reference uses ``seq_len / bptt``.
    length: ``int32[]`` valid steps of a padded window (``pad_window``); None = ``T``.
    arch: ``int32[11, 2]`` architecture of this step for the weight-sharing supernet.
    model_config: model structure.
    train_config: optimiser settings.

  Returns:
    ``(state, hidden, metrics)``: the new state, ``float32[B, H]`` state to carry, and scalars
    ``loss`` (objective incl. TAR/AR), ``nll`` (mean token NLL; ``exp`` = train perplexity) and
    ``grad_norm`` (before clipping).
  """
  loss_fn = functools.partial(model_lib.lm_loss, config=model_config, arch=arch, rng=rng,
                              length=length, tar_beta=train_config.tar_beta,
                              ar_alpha=train_config.ar_alpha)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, inputs, targets,
                                                                 hidden)
  updates, opt_state = make_optimizer(train_config).update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: u * lr_scale, updates)
  params = optax.apply_updates(state.params, updates)
  avg, count = state.avg_params, state.avg_count
  if avg is not None:
    avg, count = average_update(avg, params, count)
  state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, avg_params=avg,
                     avg_count=count)
  metrics = {'loss': loss, 'nll': aux['nll'], 'grad_norm': optax.tree.norm(grads)}
  return state, aux['hidden'], metrics


@functools.partial(jax.jit, static_argnames=('model_config',))
def eval_step(params: Params, inputs: Array, targets: Array, hidden: Array,
              length: Array | None = None, arch: Array | None = None, *,
              model_config: model_lib.LMConfig) -> tuple[Array, Array]:
  """Summed NLL of one window in evaluation mode (no dropout).

  Args:
    params: model parameters.
    inputs: ``int32[T, B]``.
    targets: ``int32[T, B]``.
    hidden: ``float32[B, H]``.
    length: ``int32[]`` valid steps (padding excluded); None = ``T``.
    arch: supernet architecture, or None.
    model_config: model structure.

  Returns:
    ``(nll_sum float32[], hidden float32[B, H])``.
  """
  out = model_lib.forward(params, inputs, hidden, config=model_config, arch=arch)
  num_steps = inputs.shape[0]
  nll = model_lib.token_nll(params, out.raw, targets)
  if length is None:
    return jnp.sum(nll), out.raw[-1]
  valid = jnp.arange(num_steps) < length
  return (jnp.sum(jnp.where(valid[:, None], nll, 0.0)),
          jax.lax.dynamic_index_in_dim(out.raw, length - 1, keepdims=False))


def evaluate(params: Params, data: np.ndarray, batch_size: int, bptt: int, *,
             model_config: model_lib.LMConfig, arch: Array | None = None,
             mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Mean NLL and perplexity over a whole stream, hidden state carried across windows.

  Windows of ``bptt`` steps as the reference's ``evaluate``; the shorter last window is padded
  to ``bptt`` (one compilation).

  Args:
    params: model parameters (e.g. ``eval_params(state)``); replicated on ``mesh`` if one is
      given.
    data: ``int[N]`` token stream (batchified here with ``nao_jax.data.text.batchify``) or an
      already batchified ``int[N // B, B]``.
    batch_size: number of columns ``B`` (reference: 10 valid, 1 test).
    bptt: window length.
    model_config: model structure.
    arch: supernet architecture, or None.
    mesh: a data mesh (``parallel.data_mesh``, possibly over several processes, each passing
      the whole ``data``): the ``B`` columns are split over its devices when ``B`` divides by
      their count; otherwise (the test batch of 1) every device scores all of them. None: the
      default device.

  Returns:
    ``{'nll': mean NLL per predicted token, 'ppl': exp(nll)}``.
  """
  data = np.asarray(data, np.int32)
  if data.ndim == 1:
    data = text.batchify(data, batch_size)
  if data.shape[1] != batch_size:
    raise ValueError(f'data has {data.shape[1]} columns, batch_size is {batch_size}')
  rows = data.shape[0]
  hidden = model_lib.init_hidden(batch_size, model_config)
  if mesh is None:
    def place(inputs, targets, length):
      return inputs, targets, length
  elif batch_size % mesh.size == 0:
    # This process feeds only its columns; windows and the carried state are split on 'data'.
    data = data[:, parallel.host_batch_slice(batch_size, mesh)]
    hidden = parallel.global_batch(
        np.zeros((data.shape[1], model_config.hidden_size), np.float32), mesh)

    def place(inputs, targets, length):
      return (*parallel.global_batch((inputs, targets), mesh, axis=1),
              parallel.replicate(length, mesh))
  else:
    hidden = parallel.replicate(np.asarray(hidden), mesh)

    def place(inputs, targets, length):
      return parallel.replicate((inputs, targets, length), mesh)
  sums = []  # device scalars: no host sync per window; summed in float64 at the end
  for start, _, _ in text.iterate_bptt(rows, None, bptt):
    inputs, targets = text.get_batch(data, start, bptt)
    n = inputs.shape[0]
    pad = ((0, bptt - n), (0, 0))
    inputs, targets, length = place(np.pad(inputs, pad), np.pad(targets, pad),
                                    np.asarray(n, np.int32))
    nll, hidden = eval_step(params, inputs, targets, hidden, length, arch,
                            model_config=model_config)
    sums.append(nll)
  nll = math.fsum(float(v) for v in sums) / ((rows - 1) * batch_size)
  return {'nll': nll, 'ppl': math.exp(nll)}
