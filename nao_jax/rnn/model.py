"""The NAO recurrent language model (DARTS / AWD-LSTM style, spec §5.3, §6.8).

One cell layer between a tied embedding and softmax decoder::

  x      = dropouti(dropoute(E)[tokens])           float32[T, B, E]
  h_1..T = cell(x, h_0)                            float32[T, B, H]   (raw outputs, for TAR)
  logits = dropout(h) @ E^T + b                    float32[T, B, V]

Dropouts are variational ("locked"): one mask per sequence (batch column), shared by all time
steps of the window: ``dropouti`` on embeddings, ``dropoutx`` on the cell input, ``dropouth`` on
``h_prev`` and every node input ``s_p``, ``dropout`` on the outputs; ``dropoute`` drops whole
embedding rows (words). Masks are scaled by ``1 / keep``. Without an ``rng`` the model is in
evaluation mode (no dropout).

Data are **time-major** (``int32[T, B]``), the layout of the reference's ``batchify`` /
``get_batch``; the hidden state ``float32[B, H]`` is passed in and out so that the caller carries
it across BPTT windows.

Params pytree::

  {'embedding': float32[V, E],          # tied with the decoder weight
   'decoder_bias': float32[V],
   'cell': {'w0': float32[E + H, 2H],
            'w': float32[11, H, 2H]      # fixed cell (config.arch set)
                 | float32[264, H, 2H]}}  # weight-sharing supernet (config.arch None)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nao_jax.rnn import cell as cell_lib
from nao_jax.spaces import get_builtin
from nao_jax.spaces.rnn import ACTIVATION_MAPPINGS

Array = jax.Array
Params = dict


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Static structure and dropout rates of the language model (hashable: a jit static arg).

  Defaults: the NAO PTB final model (spec §6.8), cell architecture still to be set.

  Attributes:
    vocab_size: number of words ``V``.
    emb_size: embedding size ``E``; must equal ``hidden_size`` because the decoder is tied.
    hidden_size: cell size ``H``.
    dropout: locked dropout on the cell outputs.
    dropouth: dropout on ``h_prev`` and on every node input ``s_p``.
    dropoutx: dropout on the cell input ``x`` (inside ``s_0``).
    dropouti: locked dropout on the embeddings.
    dropoute: probability of dropping a whole embedding row (a word).
    init_range: uniform init range of embedding and cell weights; decoder bias starts at 0.
    activations: the 4 activation names of the architecture's id mapping (``space.activations``);
      required, because the two reference code bases number activations differently.
    output_average: ``'exclude_s0'`` (final models; also our supernet default, which removes the
      reference supernet's search/eval mismatch, spec §9.1 #16) or ``'include_s0'`` (WS-RNN).
    arch: ``((pred, act),) * 11`` of a fixed cell, or None for the weight-sharing supernet, whose
      architecture is passed as data to every call.
    fuse: fixed cell only: one matmul per group of nodes sharing a predecessor (exact).
  """

  vocab_size: int = 10_000
  emb_size: int = 850
  hidden_size: int = 850
  dropout: float = 0.75
  dropouth: float = 0.25
  dropoutx: float = 0.75
  dropouti: float = 0.2
  dropoute: float = 0.0
  init_range: float = 0.04
  activations: tuple[str, ...] | None = None
  output_average: str = 'exclude_s0'
  arch: tuple[tuple[int, int], ...] | None = None
  fuse: bool = True

  def __post_init__(self):
    if self.activations is None:
      raise ValueError('activations is required: pass space.activations (NAO and NAO-WS number '
                       'activations differently)')
    object.__setattr__(self, 'activations', tuple(self.activations))
    if self.emb_size != self.hidden_size:
      raise ValueError(f'tied embedding needs emb_size == hidden_size, got {self.emb_size} and '
                       f'{self.hidden_size}')
    if self.arch is not None:
      object.__setattr__(self, 'arch', tuple(tuple(int(v) for v in row) for row in self.arch))

  @property
  def weight_sharing(self) -> bool:
    return self.arch is None

  def plan(self) -> cell_lib.CellPlan:
    """The static plan of the fixed cell."""
    if self.arch is None:
      raise ValueError('a weight-sharing config has no fixed plan; pass arch to the call')
    return cell_lib.make_plan(np.asarray(self.arch), self.activations, self.output_average,
                              self.fuse)


def builtin_config(name: str, **overrides) -> LMConfig:
  """Config of a published cell (``'NAONet-PTB'``, ``'NAONet-WS-PTB'``) with its own mapping.

  Defaults are the PTB final model (E = H = 850); e.g. WikiText-2 (spec §6.8) is
  ``builtin_config('NAONet-PTB', vocab_size=33278, emb_size=700, hidden_size=700, dropouth=0.15)``.
  """
  space, arch = get_builtin(name)
  return LMConfig(arch=tuple(map(tuple, arch.tolist())), activations=space.activations,
                  **overrides)


def ws_search_config(**overrides) -> LMConfig:
  """The WS-RNN supernet (spec §5.3): E = H = 300, NAO-WS activation ids, architecture as data.

  The cell output averages ``s_1..s_11`` like the final models (our default, which removes the
  reference's search/eval mismatch); ``output_average='include_s0'`` gives the reference
  supernet's mean over ``s_0..s_11`` (spec §9.1 #16).
  """
  kwargs = dict(emb_size=300, hidden_size=300, dropout=0.75, dropouth=0.25, dropoutx=0.75,
                dropouti=0.2, dropoute=0.0, activations=ACTIVATION_MAPPINGS['nao_ws'])
  kwargs.update(overrides)
  return LMConfig(**kwargs)


def init_params(key: Array, config: LMConfig) -> Params:
  """Reference init: uniform ±init_range for embedding (= decoder weight) and cell, bias 0."""
  k_emb, k_cell = jax.random.split(key)
  r = config.init_range
  init_cell = cell_lib.init_ws_cell if config.weight_sharing else cell_lib.init_fixed_cell
  return {
      'embedding': jax.random.uniform(k_emb, (config.vocab_size, config.emb_size), jnp.float32,
                                      -r, r),
      'decoder_bias': jnp.zeros((config.vocab_size,), jnp.float32),
      'cell': init_cell(k_cell, config.emb_size, config.hidden_size, r),
  }


def param_count(params) -> int:
  """Number of trainable scalars (works on ``jax.eval_shape`` outputs too)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def init_hidden(batch_size: int, config: LMConfig) -> Array:
  """The zero state ``float32[B, H]`` the reference starts every epoch / evaluation with."""
  return jnp.zeros((batch_size, config.hidden_size), jnp.float32)


class Masks(NamedTuple):
  """Per-window dropout masks (already scaled by 1/keep); None where the rate is 0.

  Attributes:
    words: ``float32[V]`` dropoute row mask.
    inputs: ``float32[B, E]`` dropouti and dropoutx combined (both are constant over time and
      multiply the same ``x``).
    hidden: ``float32[B, H]`` dropouth.
    outputs: ``float32[B, H]`` output dropout.
  """

  words: Array | None
  inputs: Array | None
  hidden: Array | None
  outputs: Array | None


def _mask(key: Array, rate: float, shape: tuple[int, ...]) -> Array | None:
  if rate == 0.0:
    return None
  keep = 1.0 - rate
  return jax.random.bernoulli(key, keep, shape).astype(jnp.float32) / keep


def sample_masks(rng: Array, batch_size: int, config: LMConfig) -> Masks:
  """Draws the variational-dropout masks of one training window."""
  k_e, k_i, k_x, k_h, k_o = jax.random.split(rng, 5)
  emb, hid = config.emb_size, config.hidden_size
  m_i = _mask(k_i, config.dropouti, (batch_size, emb))
  m_x = _mask(k_x, config.dropoutx, (batch_size, emb))
  inputs = m_x if m_i is None else (m_i if m_x is None else m_i * m_x)
  return Masks(words=_mask(k_e, config.dropoute, (config.vocab_size,)), inputs=inputs,
               hidden=_mask(k_h, config.dropouth, (batch_size, hid)),
               outputs=_mask(k_o, config.dropout, (batch_size, hid)))


class Outputs(NamedTuple):
  """What one window produces.

  Attributes:
    raw: ``float32[T, B, H]`` cell outputs before output dropout (TAR is taken on these).
    dropped: ``float32[T, B, H]`` after output dropout (decoder input; AR is taken on these).
  """

  raw: Array
  dropped: Array


def forward(params: Params, inputs: Array, hidden: Array, *, config: LMConfig,
            arch: Array | None = None, rng: Array | None = None) -> Outputs:
  """Runs embedding and cell over one window.

  Args:
    params: see the module docstring.
    inputs: ``int32[T, B]`` token ids.
    hidden: ``float32[B, H]`` state carried from the previous window.
    config: the model structure.
    arch: ``int32[11, 2]`` for the weight-sharing supernet (may be traced); None for a fixed cell.
    rng: dropout key; None = evaluation mode.

  Returns:
    ``Outputs``; ``raw[-1]`` (or ``raw[length - 1]`` for a padded window) is the state to carry.
  """
  masks = sample_masks(rng, inputs.shape[1], config) if rng is not None else Masks(
      None, None, None, None)
  x = jnp.take(params['embedding'], inputs, axis=0)
  if masks.words is not None:
    x = x * jnp.take(masks.words, inputs)[..., None]  # = looking up a row-dropped matrix
  if config.weight_sharing:
    if arch is None:
      raise ValueError('the weight-sharing model needs arch')
    raw = cell_lib.ws_recurrence(params['cell'], arch, config.activations, x, hidden,
                                 masks.inputs, masks.hidden, config.output_average)
  else:
    raw = cell_lib.fixed_recurrence(params['cell'], config.plan(), x, hidden, masks.inputs,
                                    masks.hidden)
  dropped = raw if masks.outputs is None else raw * masks.outputs
  return Outputs(raw, dropped)


def decode(params: Params, outputs: Array) -> Array:
  """Tied softmax decoder: ``float32[..., H]`` -> logits ``float32[..., V]``."""
  return outputs @ params['embedding'].T + params['decoder_bias']


def _time_mask(num_steps: int, length: Array | int | None) -> Array:
  steps = jnp.arange(num_steps)
  return jnp.ones((num_steps,), bool) if length is None else steps < length


def token_nll(params: Params, outputs: Array, targets: Array) -> Array:
  """Per-token negative log-likelihood ``float32[T, B]``; one ``[T*B, H] @ [H, V]`` matmul."""
  t, b, h = outputs.shape
  logits = decode(params, outputs.reshape(t * b, h))
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, targets.reshape(t * b, 1), -1)[:, 0]
  return nll.reshape(t, b)


def lm_loss(params: Params, inputs: Array, targets: Array, hidden: Array, *, config: LMConfig,
            arch: Array | None = None, rng: Array | None = None, length: Array | None = None,
            tar_beta: float = 1e-3, ar_alpha: float = 0.0) -> tuple[Array, dict]:
  """Training objective of one window: mean NLL + AR + TAR (spec §6.8).

  Args:
    params, inputs, hidden, config, arch, rng: as in ``forward``.
    targets: ``int32[T, B]`` next tokens.
    length: number of valid time steps (``int32[]``, may be traced); steps ``>= length`` are
      padding: excluded from every term and from the carried state. None = all ``T``.
    tar_beta: TAR weight, ``beta * mean((h_t - h_{t-1})^2)`` on raw outputs.
    ar_alpha: AR weight, ``alpha * mean(dropped_h^2)``.

  Returns:
    ``(loss, aux)``: ``aux['nll']`` mean NLL over valid tokens (the reported raw loss),
    ``aux['hidden']`` ``float32[B, H]`` the state to carry (gradient stopped).
  """
  out = forward(params, inputs, hidden, config=config, arch=arch, rng=rng)
  num_steps, batch = inputs.shape
  valid = _time_mask(num_steps, length).astype(jnp.float32)  # [T]
  n_valid = jnp.sum(valid)
  nll = jnp.sum(token_nll(params, out.dropped, targets) * valid[:, None]) / (n_valid * batch)
  loss = nll
  width = out.raw.shape[-1]
  if ar_alpha:
    ar = jnp.sum(jnp.square(out.dropped) * valid[:, None, None]) / (n_valid * batch * width)
    loss = loss + ar_alpha * ar
  if tar_beta:
    pair_valid = valid[1:]  # pair (t-1, t) is valid when step t is
    diff = jnp.square(out.raw[1:] - out.raw[:-1]) * pair_valid[:, None, None]
    tar = jnp.sum(diff) / (jnp.maximum(jnp.sum(pair_valid), 1.0) * batch * width)
    loss = loss + tar_beta * tar
  last = num_steps - 1 if length is None else length - 1
  new_hidden = jax.lax.stop_gradient(jax.lax.dynamic_index_in_dim(out.raw, last, keepdims=False))
  return loss, {'nll': nll, 'hidden': new_hidden}
