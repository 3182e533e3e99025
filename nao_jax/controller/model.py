"""The NAO encoder-predictor-decoder (EPD) as a Flax module (spec §3).

Shapes: ``B`` batch, ``L`` tokens per architecture, ``T = L / tokens_per_step`` encoder steps,
``H`` hidden size, ``V`` vocabulary.

* Encoder: token embedding ``[B, L, E]`` -> chunks ``[B, T, r*E]`` (one branch per step) -> LSTM
  -> per-step L2 normalisation = attention memory ``h: float32[B, T, H]`` -> embedding
  ``e = l2norm(mean_t h_t)``.
* Predictor: MLP(e) -> sigmoid, ``float32[B]``.
* Decoder: LSTM started from ``(h, c) = (e, e)``, attending over ``h``; teacher forcing in
  training, greedy masked decoding at inference.

Speed: the LSTMs are written by hand so that everything that does not depend on the recurrent
state (input projections for all steps, and with Luong attention the whole attention and output
layer) runs as large batched matmuls outside the ``lax.scan``; only ``h @ W_hh`` stays inside.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nao_jax.controller.config import ControllerConfig
from nao_jax.controller.lstm import lstm_recurrence

Array = jax.Array
NEG_INF = -1e9  # finite, so masked logits never produce NaN in softmax / argmax


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """``x / max(||x||, eps)`` as ``torch.nn.functional.normalize``."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def _uniform(scale: float) -> Callable:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)
  return init


def _folded_projection(tokens: Array, tables: Array, bias: Array) -> Array:
  """``concat_r(emb[tokens[..., r]]) @ W_ih + b`` as a lookup in pre-multiplied tables.

  The LSTM inputs are embeddings of a vocabulary of ``V`` tokens, so their projections are rows
  of ``emb @ W_ih`` (``tables: [r, V, 4H]``, one per token of a step). Selecting the rows with a
  one-hot matmul replaces the ``[T*B, r*E] x [r*E, 4H]`` input projection and its two backward
  matmuls by ``V``-wide ones (the same sum up to float32 rounding; about a third of the
  training step's FLOPs). ``tokens: int32[T, B, r]`` -> ``float32[T, B, 4H]``.
  """
  # Each one-hot row selects exactly one row of tables[0], so the bias can live there: one
  # pass less over the [T, B, 4H] result.
  tables = tables.at[0].add(bias)
  one_hot = jax.nn.one_hot(tokens, tables.shape[1], dtype=tables.dtype)
  return jnp.einsum('tbrv,rvg->tbg', one_hot, tables)


def _lstm_cell(gates: Array, c: Array, forget_bias: float) -> tuple[Array, Array]:
  """One LSTM update from pre-activations ``gates: [..., 4H]`` (order i, f, g, o)."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f + forget_bias) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


class Controller(nn.Module):
  """Encoder, predictor and decoder sharing one parameter tree."""
  config: ControllerConfig

  def setup(self):
    cfg = self.config
    h, v = cfg.hidden_size, cfg.vocab_size
    pytorch = cfg.init == 'pytorch'

    def linear_init(fan_in):
      return _uniform(1.0 / math.sqrt(fan_in)) if pytorch else _uniform(0.1)

    lstm_init = _uniform(1.0 / math.sqrt(h)) if pytorch else _uniform(0.1)
    decoder_recurrent_init = lstm_init if pytorch else nn.initializers.orthogonal()
    emb_init = nn.initializers.normal(1.0) if pytorch else _uniform(0.1)
    self.enc_emb = self.param('enc_emb', emb_init, (v, cfg.emb_size))
    self.enc_w_ih = self.param('enc_w_ih', lstm_init, (h, 4 * h))
    self.enc_w_hh = self.param('enc_w_hh', lstm_init, (h, 4 * h))
    self.enc_b = self.param('enc_b', lstm_init, (4 * h,))
    mlp = []
    fan_in = h
    for layer in range(cfg.mlp_layers):
      mlp.append((self.param(f'mlp_w{layer}', linear_init(fan_in), (fan_in, cfg.mlp_hidden)),
                  self.param(f'mlp_b{layer}', linear_init(fan_in), (cfg.mlp_hidden,))))
      fan_in = cfg.mlp_hidden
    self.mlp = mlp
    self.pred_w = self.param('pred_w', linear_init(fan_in), (fan_in, 1))
    self.pred_b = self.param('pred_b', linear_init(fan_in), (1,))
    self.dec_emb = self.param('dec_emb', emb_init, (v, h))
    dec_in = 2 * h if cfg.attention == 'bahdanau' else h  # TF feeds the attention back
    self.dec_w_ih = self.param('dec_w_ih', lstm_init, (dec_in, 4 * h))
    self.dec_w_hh = self.param('dec_w_hh', decoder_recurrent_init, (h, 4 * h))
    self.dec_b = self.param('dec_b', lstm_init, (4 * h,))
    if cfg.attention == 'luong':
      self.att_w_in = self.param('att_w_in', linear_init(h), (h, h))
      self.att_w_out = self.param('att_w_out', linear_init(2 * h), (2 * h, h))
    else:
      self.att_w_key = self.param('att_w_key', linear_init(h), (h, h))
      self.att_w_query = self.param('att_w_query', linear_init(h), (h, h))
      self.att_v = self.param('att_v', linear_init(h), (h,))
      self.att_g = self.param('att_g', nn.initializers.constant(math.sqrt(1.0 / h)), ())
      self.att_b = self.param('att_b', nn.initializers.zeros, (h,))
    self.out_w = self.param('out_w', linear_init(h), (h, v))
    self.out_b = self.param('out_b', linear_init(h), (v,))

  # -- encoder and predictor ------------------------------------------------------------------

  def encode(self, tokens: Array, train: bool = False) -> tuple[Array, Array]:
    """Encodes ``int32[B, L]`` tokens.

    Returns:
      ``(memory, embedding)``: the L2-normalised per-step outputs ``float32[B, T, H]`` and the
      architecture embedding ``float32[B, H]``.
    """
    cfg = self.config
    batch = tokens.shape[0]
    steps = tokens.reshape(batch, cfg.encoder_length, cfg.tokens_per_step)
    if cfg.encoder_dropout_on == 'embeddings' and train and cfg.encoder_dropout > 0:
      x = jnp.take(self.enc_emb, steps, axis=0).reshape(batch, cfg.encoder_length, -1)
      x = self._dropout(x, cfg.encoder_dropout, train)
      input_proj = jnp.swapaxes(x @ self.enc_w_ih + self.enc_b, 0, 1)
    else:
      w_ih = self.enc_w_ih.reshape(cfg.tokens_per_step, cfg.emb_size, -1)
      tables = jnp.einsum('ve,reg->rvg', self.enc_emb, w_ih)  # [r, V, 4H]
      input_proj = _folded_projection(jnp.swapaxes(steps, 0, 1), tables, self.enc_b)
    zeros = jnp.zeros((batch, cfg.hidden_size))
    outputs = self._run_lstm(input_proj, self.enc_w_hh, zeros, zeros)
    if cfg.encoder_dropout_on == 'outputs':
      outputs = self._dropout(outputs, cfg.encoder_dropout, train)
    memory = l2_normalize(outputs)
    return memory, self.pool(memory)

  @staticmethod
  def pool(memory: Array) -> Array:
    """Architecture embedding ``float32[B, H]`` from the memory ``float32[B, T, H]``."""
    return l2_normalize(jnp.mean(memory, axis=1))

  def predict(self, embedding: Array, train: bool = False) -> Array:
    """Predicted normalised score ``float32[B]`` in (0, 1)."""
    x = embedding
    for w, b in self.mlp:
      x = self._dropout(jax.nn.relu(x @ w + b), self.config.mlp_dropout, train)
    return jax.nn.sigmoid(x @ self.pred_w + self.pred_b)[..., 0]

  def predict_from_memory(self, memory: Array) -> Array:
    """The predictor as a function of the (moved) memory, for the embedding-space gradient."""
    return self.predict(self.pool(memory))

  # -- decoder --------------------------------------------------------------------------------

  def decode_teacher_forced(self, memory: Array, embedding: Array, decoder_inputs: Array,
                            train: bool = False) -> Array:
    """Logits ``float32[B, L, V]`` for the targets following ``decoder_inputs: int32[B, L]``."""
    cfg = self.config
    embedded = lambda: self._dropout(jnp.take(self.dec_emb, decoder_inputs, axis=0),
                                     cfg.decoder_dropout, train)
    if cfg.attention == 'bahdanau':
      return self._bahdanau_teacher_forced(embedded(), memory, embedding)
    if train and cfg.decoder_dropout > 0:  # dropout acts on the embeddings: no folding
      input_proj = jnp.swapaxes(embedded() @ self.dec_w_ih + self.dec_b, 0, 1)
    else:
      table = (self.dec_emb @ self.dec_w_ih)[None]  # [1, V, 4H]
      input_proj = _folded_projection(decoder_inputs.T[..., None], table, self.dec_b)
    outputs = self._run_lstm(input_proj, self.dec_w_hh, embedding, embedding)
    return self._luong_logits(outputs, memory)

  def decode_greedy(self, memory: Array, embedding: Array, mask_table: Array) -> Array:
    """Greedy decoding under ``mask_table: bool[L, V, V]`` (position, previous, next).

    Returns:
      ``int32[B, L]`` tokens; every one is allowed by the mask given its predecessor.
    """
    cfg = self.config
    batch, h = embedding.shape[0], cfg.hidden_size
    keys = memory @ self.att_w_key if cfg.attention == 'bahdanau' else None

    def step(carry, mask_t):
      hid, cell, prev, attention = carry
      x = jnp.take(self.dec_emb, prev, axis=0)
      if cfg.attention == 'luong':
        gates = x @ self.dec_w_ih + self.dec_b + hid @ self.dec_w_hh
        hid, cell = _lstm_cell(gates, cell, cfg.forget_bias)
        logits = self._luong_logits(hid[:, None], memory)[:, 0]
      else:
        gates = jnp.concatenate([x, attention], -1) @ self.dec_w_ih + self.dec_b + hid @ self.dec_w_hh
        hid, cell = _lstm_cell(gates, cell, cfg.forget_bias)
        attention = self._bahdanau_context(hid, keys, memory)
        logits = hid @ self.out_w + self.out_b
      allowed = jnp.take(mask_t, prev, axis=0)  # [B, V]
      token = jnp.argmax(jnp.where(allowed, logits, NEG_INF), axis=-1).astype(jnp.int32)
      return (hid, cell, token, attention), token

    init = (embedding, embedding, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, h)))
    _, tokens = jax.lax.scan(step, init, mask_table)
    return tokens.T

  def __call__(self, tokens: Array, decoder_inputs: Array, train: bool = False):
    """Training forward pass: ``(predictions float32[B], logits float32[B, L, V])``."""
    memory, embedding = self.encode(tokens, train)
    return (self.predict(embedding, train),
            self.decode_teacher_forced(memory, embedding, decoder_inputs, train))

  # -- pieces ---------------------------------------------------------------------------------

  def _run_lstm(self, input_proj: Array, w_hh: Array, h0: Array, c0: Array) -> Array:
    """Runs an LSTM over time-major input projections ``[T, B, 4H]``; returns ``[B, T, H]``."""
    outputs = lstm_recurrence(input_proj, w_hh, h0, c0, self.config.forget_bias)
    return jnp.swapaxes(outputs, 0, 1)

  def _luong_logits(self, outputs: Array, memory: Array) -> Array:
    """PT-V1 attention on LSTM outputs ``[B, S, H]`` over ``memory [B, T, H]`` -> ``[B, S, V]``."""
    query = outputs @ self.att_w_in
    weights = jax.nn.softmax(jnp.einsum('bsh,bth->bst', query, memory), axis=-1)
    mix = jnp.einsum('bst,bth->bsh', weights, memory)
    combined = jnp.tanh(jnp.concatenate([mix, outputs], -1) @ self.att_w_out)
    return combined @ self.out_w + self.out_b

  def _bahdanau_context(self, query_h: Array, keys: Array, memory: Array) -> Array:
    """TF normalised Bahdanau attention: context ``[B, H]`` for the query ``[B, H]``."""
    v = self.att_g * self.att_v / jnp.linalg.norm(self.att_v)
    scores = jnp.tanh(keys + (query_h @ self.att_w_query)[:, None] + self.att_b) @ v
    return jnp.einsum('bt,bth->bh', jax.nn.softmax(scores, axis=-1), memory)

  def _bahdanau_teacher_forced(self, x: Array, memory: Array, embedding: Array) -> Array:
    h = self.config.hidden_size
    keys = memory @ self.att_w_key
    emb_proj = x @ self.dec_w_ih[:h] + self.dec_b
    w_att = self.dec_w_ih[h:]

    def step(carry, gates_x):
      hid, cell, attention = carry
      hid, cell = _lstm_cell(gates_x + attention @ w_att + hid @ self.dec_w_hh, cell,
                             self.config.forget_bias)
      attention = self._bahdanau_context(hid, keys, memory)
      return (hid, cell, attention), hid

    init = (embedding, embedding, jnp.zeros_like(embedding))
    _, outputs = jax.lax.scan(step, init, jnp.swapaxes(emb_proj, 0, 1))
    return jnp.swapaxes(outputs, 0, 1) @ self.out_w + self.out_b

  def _dropout(self, x: Array, rate: float, train: bool) -> Array:
    if not train or rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)
