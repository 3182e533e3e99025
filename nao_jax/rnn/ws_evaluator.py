"""Weight-sharing evaluator for NAO-WS on PTB: the WS-RNN supernet (spec §5.3, §5.4, §9.1 #16).

Fits ``nao_jax.search.evaluators`` (``stationary = False``): the search loop calls
``start_round(pool, r)`` (the supernet trains), then ``evaluate(pool)`` (every pool architecture
scored in one compiled program), every round; ``from_config(config, workdir)`` is what the
registry entry ``EVALUATORS['ws_rnn']`` builds, from the search config's ``ws_rnn`` section.

Training (``NAO-WS/rnn/train_search.sh``): a single-layer LM with E = H = 300, tied decoder, the
supernet cell (weights per (node, predecessor, activation)), dropouts 0.75 / 0.25 / 0.75 / 0.2 /
0, SGD lr 0.25 scaled by ``seq_len / 35``, weight decay 5e-7, clip 10, TAR 1e-3, batch 256, BPTT
35 (17 with probability 0.05, no jitter), ``epochs_per_round`` (200) epochs before each of the
five scorings (1000 epochs in all); one architecture per minibatch, drawn uniformly from the
pool of the round. The hidden state is carried across minibatches although the architecture
changes, as the reference does; ``reset_hidden_on_arch_change=True`` starts each minibatch whose
architecture differs from the previous one from zeros instead.

Scoring: eval mode (no dropout), zero hidden state, mean NLL of a validation window of
``bptt`` rows x ``score_batch_size`` (256) columns of the batchified validation stream;
``higher_is_better = False``, ``score_name = 'valid_nll'``. ``score_window``:

* ``'fixed'`` (default): every architecture, every round, on the same window(s): rows
  ``[0, 35)`` (``score_num_windows = 1``) or that many windows spread evenly over the stream,
  averaged. Differences between scores are then differences between architectures.
* ``'reference'``: the official code's window: a start row drawn uniformly from
  ``[0, rows / 35)`` per architecture and used as a row index (the intended ``x 35`` is missing,
  spec §9.1 #16), deterministic per (seed, round, architecture).

Two more deviations are named options: ``output_average`` (``'exclude_s0'``, our default, makes
the supernet's cell output the final models' mean(s_1..s_11); ``'include_s0'`` is the reference
supernet's mean(s_0..s_11)), and ``pad_multiple`` (windows padded to buckets, so a 17-step window
costs 20 steps; no effect on the numbers).

Resume: the state (parameters, optimizer state, carried hidden state, key) and the position
(step, epoch, window in the epoch, round, pool digest) are Orbax checkpoints under
``<workdir>/supernet``, written at the end of every round's training and every
``checkpoint_every_steps``. Window lengths of epoch ``e`` come from ``default_rng([seed, 1, e])``,
the architecture of step ``s`` from ``default_rng([seed, 2, s])`` and its dropout key from
``fold_in(key, s)``, so a new evaluator on the same workdir continues exactly where a killed one
stopped. ``start_round`` is idempotent: a round already trained trains nothing; the round in
progress trains only its remaining steps (the pool must be the same).

Devices: data parallel over every device of every process (``parallel.data_mesh()``), as
``nao_jax.rnn.lm``. Parameters, optimizer state and key are replicated; the ``batch_size``
training columns are split over the devices (each process feeds only its columns of every
``[T, B]`` window, and the carried hidden state ``[B, H]`` is split by rows), so ``batch_size``
must divide by the device count (a ``ValueError`` before the corpus is read). The
``score_batch_size`` validation columns are split the same way when they divide, else every
device scores all of them; either way every process gets the same scores. Every process samples
the same architectures and windows from the seed, saves and restores the (collective) Orbax
checkpoints, whose hidden state is gathered first; only the primary writes TensorBoard.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
import zlib
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from nao_jax import parallel
from nao_jax.checkpoint import RunCheckpointer
from nao_jax.data import text
from nao_jax.progress import ScalarWriter
from nao_jax.rnn import model as model_lib
from nao_jax.rnn import train as train_lib
from nao_jax.spaces import RNN_WS_SPACE

SCORE_WINDOWS = ('fixed', 'reference')
OUTPUT_AVERAGES = ('exclude_s0', 'include_s0')
DATASETS = ('ptb', 'wikitext2')

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class WsRnnConfig:
  """Supernet, training and scoring settings; defaults are WS-RNN's (spec §5.3).

  Attributes:
    data_dir: folder of the corpus files; '' = ``$NAO_DATA_DIR/<dataset>``.
    dataset: ``ptb`` or ``wikitext2`` (only names the default folder).
    train_tokens: use the first N training tokens (0: all; for tests and quick runs).
    valid_tokens: use the first N validation tokens (0: all).
    emb_size: embedding size (= hidden_size: tied decoder).
    hidden_size: cell size.
    dropout, dropouth, dropoutx, dropouti, dropoute: see ``model.LMConfig``.
    init_range: uniform init range.
    output_average: ``exclude_s0`` (default, = final models) or ``include_s0`` (reference).
    lr: SGD rate, scaled per window by ``seq_len / bptt``.
    clip: global gradient norm.
    weight_decay: coupled L2 (added after clipping).
    tar_beta: TAR weight; ar_alpha: AR weight.
    batch_size: training columns.
    bptt: base window; also the scoring window length.
    seq_p_full, seq_std, seq_min_len, seq_max_delta: the BPTT sampler (no jitter in search).
    pad_multiple: training windows padded to a multiple of this (one program per bucket).
    epochs_per_round: supernet epochs before each round's scoring (reference: 200 of 1000).
    reset_hidden_on_arch_change: zero the carried hidden state when the architecture changes
      (the reference carries it; see the module docstring).
    score_window: ``fixed`` or ``reference`` (see the module docstring).
    score_num_windows: ``fixed``: windows averaged per architecture.
    score_batch_size: columns of the batchified validation stream.
    score_capacity: architectures per compiled scoring call; pools are padded to a multiple
      (padding entries are skipped by a ``cond``, so they cost no compute).
    checkpoint_every_steps: mid-round supernet checkpoints (0: at round ends only).
    log_every_steps: steps between metric fetches (NaN guard, progress line, TensorBoard).
    seed: data order, architecture sampling, init, dropout.
  """
  data_dir: str = ''
  dataset: str = 'ptb'
  train_tokens: int = 0
  valid_tokens: int = 0
  emb_size: int = 300
  hidden_size: int = 300
  dropout: float = 0.75
  dropouth: float = 0.25
  dropoutx: float = 0.75
  dropouti: float = 0.2
  dropoute: float = 0.0
  init_range: float = 0.04
  output_average: str = 'exclude_s0'
  lr: float = 0.25
  clip: float = 10.0
  weight_decay: float = 5e-7
  tar_beta: float = 1e-3
  ar_alpha: float = 0.0
  batch_size: int = 256
  bptt: int = 35
  seq_p_full: float = 0.95
  seq_std: float = 0.0
  seq_min_len: int = 5
  seq_max_delta: int = 20
  pad_multiple: int = 5
  epochs_per_round: int = 200
  reset_hidden_on_arch_change: bool = False
  score_window: str = 'fixed'
  score_num_windows: int = 1
  score_batch_size: int = 256
  score_capacity: int = 1024
  checkpoint_every_steps: int = 0
  log_every_steps: int = 100
  seed: int = 0

  def __post_init__(self):
    for name, choices in (('score_window', SCORE_WINDOWS), ('output_average', OUTPUT_AVERAGES),
                          ('dataset', DATASETS)):
      if getattr(self, name) not in choices:
        raise ValueError(f'ws_rnn.{name} = {getattr(self, name)!r}; choose one of '
                         f'{", ".join(choices)}')
    for name in ('emb_size', 'hidden_size', 'batch_size', 'bptt', 'seq_min_len', 'pad_multiple',
                 'epochs_per_round', 'score_num_windows', 'score_batch_size', 'score_capacity',
                 'log_every_steps'):
      if getattr(self, name) < 1:
        raise ValueError(f'ws_rnn.{name} must be >= 1, got {getattr(self, name)}')
    for name in ('train_tokens', 'valid_tokens', 'checkpoint_every_steps', 'seq_max_delta'):
      if getattr(self, name) < 0:
        raise ValueError(f'ws_rnn.{name} must be >= 0, got {getattr(self, name)}')
    if self.emb_size != self.hidden_size:
      raise ValueError(f'ws_rnn.emb_size {self.emb_size} != hidden_size {self.hidden_size}: the '
                       'decoder is tied to the embedding')
    if self.lr <= 0 or self.clip <= 0:
      raise ValueError(f'ws_rnn.lr and ws_rnn.clip must be > 0, got {self.lr}, {self.clip}')

  def model_config(self, vocab_size: int) -> model_lib.LMConfig:
    return model_lib.ws_search_config(
        vocab_size=vocab_size, emb_size=self.emb_size, hidden_size=self.hidden_size,
        dropout=self.dropout, dropouth=self.dropouth, dropoutx=self.dropoutx,
        dropouti=self.dropouti, dropoute=self.dropoute, init_range=self.init_range,
        output_average=self.output_average)

  def train_config(self) -> train_lib.TrainConfig:
    return train_lib.TrainConfig(lr=self.lr, clip=self.clip, weight_decay=self.weight_decay,
                                 tar_beta=self.tar_beta, ar_alpha=self.ar_alpha, bptt=self.bptt)


@functools.partial(jax.jit, static_argnames=('model_config', 'bptt'))
def score_archs(params: dict, archs: Array, starts: Array, count: Array, valid: Array, *,
                model_config: model_lib.LMConfig, bptt: int) -> Array:
  """Mean validation NLL of each architecture with shared weights, in one program.

  ``lax.map`` runs the architectures one after another (the memory of one), each over its
  windows from a zero hidden state, in evaluation mode; entries ``>= count`` are padding and
  skipped by a ``cond``. The architecture is data: one compilation per (capacity, windows).

  Args:
    params: supernet parameters (on one device, or replicated over a data mesh).
    archs: ``int32[P, 11, 2]``.
    starts: ``int32[P, W]`` first row of each architecture's windows.
    count: ``int32[]`` number of real entries.
    valid: ``int32[R, B]`` the batchified validation stream; its columns may be split over a
      data mesh (the program follows that sharding and all-reduces each window's mean).
    model_config: the supernet structure.
    bptt: window length (``starts + bptt + 1 <= R``).

  Returns:
    ``float32[P]``: mean NLL over the ``W * bptt * B`` predictions of each entry (0 for padding).
  """
  batch = valid.shape[1]
  zeros = model_lib.init_hidden(batch, model_config)

  def one(args):
    index, arch, arch_starts = args

    def compute(_):
      def window(total, start):
        inputs = jax.lax.dynamic_slice_in_dim(valid, start, bptt, 0)
        targets = jax.lax.dynamic_slice_in_dim(valid, start + 1, bptt, 0)
        out = model_lib.forward(params, inputs, zeros, config=model_config, arch=arch)
        return total + jnp.mean(model_lib.token_nll(params, out.raw, targets)), None
      total, _ = jax.lax.scan(window, jnp.zeros((), jnp.float32), arch_starts)
      return total / arch_starts.shape[0]

    return jax.lax.cond(index < count, compute, lambda _: jnp.zeros((), jnp.float32), None)

  return jax.lax.map(one, (jnp.arange(archs.shape[0]), archs, starts))


def _place_columns(data: np.ndarray, mesh: jax.sharding.Mesh) -> Array:
  """The batchified validation stream ``int32[R, B]`` on ``mesh``.

  Its ``B`` columns are split over the devices when they divide (each process places only its
  own), else replicated (every device scores all columns).
  """
  data = np.asarray(data, np.int32)
  batch = data.shape[1]
  if batch % mesh.size:
    return parallel.replicate(data, mesh)
  return parallel.global_batch(data[:, parallel.host_batch_slice(batch, mesh)], mesh, axis=1)


def _digest(archs: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(archs, np.int32).tobytes()).hexdigest()


def data_mesh(batch_size: int) -> jax.sharding.Mesh:
  """The data mesh for ``ws_rnn.batch_size`` columns (``parallel.column_mesh``)."""
  return parallel.column_mesh(batch_size, 'ws_rnn.batch_size')


def _fresh_state(seed: int, mcfg: model_lib.LMConfig, tcfg: train_lib.TrainConfig,
                 batch_size: int, mesh: jax.sharding.Mesh) -> dict:
  """The initial state on ``mesh``: parameters, optimizer state and key replicated, hidden split.

  Every process initialises from the same seed, so the replicated values agree.
  """
  key = jax.random.key(seed)
  train = train_lib.init_train_state(model_lib.init_params(key, mcfg), tcfg)
  return {'train': parallel.replicate(train, mesh), 'rng': parallel.replicate(key, mesh),
          'hidden': parallel.split_zeros(batch_size, mcfg.hidden_size, mesh)}


def _host_copy(x: Array, mesh: jax.sharding.Mesh) -> np.ndarray:
  """``x`` as numpy on this host: gathered (a no-op when replicated), then the local copy.

  A global array of a multi-process mesh cannot be read whole unless it is replicated; every
  process then reads the same values.
  """
  return np.asarray(parallel.gather(x, mesh).addressable_data(0))


class WsRnnEvaluator:
  """Scores ``rnn_ws`` architectures with the WS-RNN supernet (see the module docstring).

  Args:
    config: settings.
    corpus: the language-model corpus (``nao_jax.data.text.Corpus``).
    workdir: the search's run directory; supernet checkpoints go to ``<workdir>/supernet`` and
      TensorBoard scalars to ``<workdir>/tb/supernet``, and an existing checkpoint is restored
      here. None: no checkpoints, no scalars.
    mesh: the data mesh (default ``data_mesh(config.batch_size)``: every device of every
      process); ``config.batch_size`` must divide by its size.

  Raises:
    ValueError: ``batch_size`` does not divide over the mesh, or too little data.
  """

  space = RNN_WS_SPACE
  higher_is_better = False
  score_name = 'valid_nll'
  stationary = False

  def __init__(self, config: WsRnnConfig, corpus: text.Corpus, workdir: str | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self.config = cfg = config
    if mesh is None:
      mesh = data_mesh(cfg.batch_size)
    else:
      parallel.check_batch_size(cfg.batch_size, mesh)
    self.mesh = mesh
    train_ids = corpus.train[:cfg.train_tokens] if cfg.train_tokens else corpus.train
    valid_ids = corpus.valid[:cfg.valid_tokens] if cfg.valid_tokens else corpus.valid
    self.train_data = text.batchify(train_ids, cfg.batch_size)
    self.valid_data = text.batchify(valid_ids, cfg.score_batch_size)
    if len(self.train_data) < 3:
      raise ValueError(f'{len(train_ids)} training tokens give {len(self.train_data)} rows of '
                       f'batch {cfg.batch_size}; need at least 3')
    self.score_bptt = min(cfg.bptt, len(self.valid_data) - 1)
    if self.score_bptt < 1:
      raise ValueError(f'{len(valid_ids)} validation tokens cannot fill a scoring window of '
                       f'{cfg.score_batch_size} columns')
    self.model_config = cfg.model_config(corpus.vocab_size)
    self.train_config = cfg.train_config()
    # Every process holds the whole corpus and feeds only its columns of each training window.
    self._host_train = np.ascontiguousarray(
        self.train_data[:, parallel.host_batch_slice(cfg.batch_size, mesh)])
    self._valid = _place_columns(self.valid_data, mesh)
    self.state = _fresh_state(cfg.seed, self.model_config, self.train_config, cfg.batch_size,
                              mesh)
    self._key = self.state['rng']
    self.step = 0
    self.epoch = 0
    self.window = 0                  # windows of `epoch` done
    self._round = -1                 # round whose training was started last
    self._round_done = False
    self._pool_digest = ''
    self._prev_arch: list | None = None
    self._cache: dict[bytes, dict] = {}
    self.last_metrics: dict[str, float] = {}
    self.workdir = workdir
    self._checkpointer = None
    self._writer = None
    logging.info('supernet: %d training rows of batch %d, scoring batch %d%s, on %d device(s) '
                 'of %d process(es)', len(self.train_data), cfg.batch_size, cfg.score_batch_size,
                 '' if cfg.score_batch_size % mesh.size == 0 else ' (not split)', mesh.size,
                 jax.process_count())
    if workdir is not None:
      self._checkpointer = RunCheckpointer(workdir, max_to_keep=2, subdir='supernet')
      self._writer = ScalarWriter(os.path.join(workdir, 'tb', 'supernet'))
      latest = self._checkpointer.latest_step()
      if latest is not None:
        self._load(latest)
        logging.info('supernet resumed at step %d (epoch %d, window %d, round %d%s)', self.step,
                     self.epoch + 1, self.window, self._round,
                     ', trained' if self._round_done else '')

  # -- data order --------------------------------------------------------------------------------

  def epoch_windows(self, epoch: int) -> list[tuple[int, int, float]]:
    """``[(start_row, seq_len, seq_len / bptt)]`` of supernet epoch ``epoch``."""
    cfg = self.config
    return list(text.iterate_bptt(len(self.train_data), np.random.default_rng([cfg.seed, 1, epoch]),
                                  cfg.bptt, max_delta=cfg.seq_max_delta, std=cfg.seq_std,
                                  min_len=cfg.seq_min_len, p_full=cfg.seq_p_full))

  def arch_index(self, step: int, pool_size: int) -> int:
    """Pool index of the architecture trained at global step ``step`` (uniform)."""
    return int(np.random.default_rng([self.config.seed, 2, step]).integers(pool_size))

  # -- training ----------------------------------------------------------------------------------

  def train_epochs_until(self, pool_archs: np.ndarray, epoch: int) -> None:
    """Trains on ``pool_archs`` until ``epoch`` epochs are complete (resumes mid-epoch)."""
    cfg = self.config
    pool = np.asarray(pool_archs, np.int32)
    tokens, started, first = 0, time.time(), True
    pending: list = []
    total_steps = None
    while self.epoch < epoch:
      windows = self.epoch_windows(self.epoch)
      if total_steps is None:  # for the ETA: this round's remaining steps, roughly
        total_steps = (epoch - self.epoch) * len(windows) - self.window
        done_before = self.step
      if self.window == 0:
        self.state = dict(self.state, hidden=self._zero_hidden())
        self._prev_arch = None
      for w in range(self.window, len(windows)):
        start, seq_len, seq_scale = windows[w]
        index = self.arch_index(self.step, len(pool))
        arch = pool[index]
        hidden = self.state['hidden']
        if (cfg.reset_hidden_on_arch_change and self._prev_arch is not None
            and not np.array_equal(arch, self._prev_arch)):
          hidden = self._zero_hidden()
        inputs, targets, length = train_lib.pad_window(
            *text.get_batch(self._host_train, start, seq_len), cfg.pad_multiple)
        # This process's columns -> the global [T, B] window, split on 'data' like the hidden
        # state; the step follows these shardings (parameters replicated, gradients all-reduced).
        inputs, targets = parallel.global_batch((inputs, targets), self.mesh, axis=1)
        train_state, hidden, metrics = train_lib.train_step(
            self.state['train'], inputs, targets, hidden,
            jax.random.fold_in(self._key, self.step), np.float32(seq_scale), length, arch,
            model_config=self.model_config, train_config=self.train_config)
        self.state = dict(self.state, train=train_state, hidden=hidden)
        self._prev_arch = arch.tolist()
        self.step += 1
        self.window = w + 1
        pending.append(metrics)
        if first:  # compilation is not throughput
          jax.block_until_ready(metrics)
          tokens, started, first = 0, time.time(), False
        else:
          tokens += seq_len * cfg.batch_size
        if self.step % cfg.log_every_steps == 0:
          self._flush(pending, tokens, started, total_steps - (self.step - done_before), index)
          tokens, started = 0, time.time()
        if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
          self.save()
      self.epoch, self.window = self.epoch + 1, 0
    self._flush(pending, tokens, started, 0, None)

  def _zero_hidden(self) -> Array:
    return parallel.split_zeros(self.config.batch_size, self.model_config.hidden_size, self.mesh)

  def _flush(self, pending: list, tokens: int, started: float, steps_left: int,
             arch_index: int | None) -> None:
    """Fetches step metrics (NaN guard), logs a progress line and TensorBoard scalars."""
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    tok_per_s = tokens / max(time.time() - started, 1e-9)  # after the fetch: steps are done
    for m in fetched:
      if not all(math.isfinite(float(v)) for v in m.values()):
        raise FloatingPointError(
            f'supernet training diverged near step {self.step} (epoch {self.epoch + 1}): '
            f'{ {k: float(v) for k, v in m.items()} }; the last good state is the newest '
            f'checkpoint under {self.workdir}/supernet; lower ws_rnn.lr')
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    means['ppl'] = math.exp(min(means['nll'], 50.0))
    means['tok_per_s'] = tok_per_s
    self.last_metrics = dict(means, step=self.step, epoch=self.epoch, round=self._round)
    if self._writer is not None:
      for k, v in means.items():
        self._writer.scalar(f'supernet/{k}', v, self.step)
    eta = steps_left * self.config.bptt * self.config.batch_size / tok_per_s if tok_per_s else 0
    logging.info('supernet round %d epoch %d window %d step %d: %.0f tok/s, round ETA %s; loss '
                 '%.4f ppl %.2f grad_norm %.3f%s', self._round, self.epoch + 1, self.window,
                 self.step, tok_per_s, _duration(eta), means['loss'], means['ppl'],
                 means['grad_norm'], '' if arch_index is None else f' arch #{arch_index}')

  def start_round(self, pool_archs: np.ndarray, round_index: int) -> None:
    """Trains the supernet until the end of round ``round_index``'s training, on this pool.

    The round's training ends at epoch ``(round_index + 1) * epochs_per_round``. Idempotent
    across restarts: a round already trained trains nothing (same pool required), the round in
    progress (restored from a mid-round checkpoint) continues with its remaining steps.

    Raises:
      ValueError: an invalid architecture, or a round resumed with a different pool.
    """
    pool = np.stack([RNN_WS_SPACE.validate(a) for a in pool_archs]).astype(np.int32)
    digest = _digest(pool)
    if round_index < self._round or (round_index == self._round and self._round_done):
      if round_index == self._round and digest != self._pool_digest:
        raise ValueError(f'supernet round {round_index} was trained on a different pool')
      return
    if round_index == self._round:
      if digest != self._pool_digest:
        raise ValueError(f'supernet round {round_index} is being resumed with a different pool')
    else:
      self._round, self._round_done, self._pool_digest = round_index, False, digest
    self._cache.clear()
    target = (round_index + 1) * self.config.epochs_per_round
    logging.info('supernet round %d: training epochs %d..%d on a pool of %d', round_index,
                 self.epoch + 1, target, len(pool))
    self.train_epochs_until(pool, target)
    self._round_done = True
    self.save()

  # -- scoring -----------------------------------------------------------------------------------

  def score_starts(self, archs: np.ndarray) -> np.ndarray:
    """``int32[P, W]``: first validation row of each architecture's windows."""
    cfg = self.config
    rows, bptt = len(self.valid_data), self.score_bptt
    if cfg.score_window == 'fixed':
      last = rows - bptt - 1
      starts = np.linspace(0, last, cfg.score_num_windows).round().astype(np.int32)
      if cfg.score_num_windows == 1:
        starts = np.zeros((1,), np.int32)
      return np.tile(starts, (len(archs), 1))
    # The reference: randint(0, rows // bptt) used as a row (no "* bptt"), per architecture.
    high = max(rows // cfg.bptt, 1)
    starts = [np.random.default_rng([cfg.seed, 3, max(self._round, 0),
                                     zlib.crc32(a.tobytes())]).integers(high) for a in archs]
    return np.minimum(np.asarray(starts, np.int32), rows - bptt - 1)[:, None]

  def score(self, archs: np.ndarray) -> np.ndarray:
    """Mean validation NLL of each architecture with the current weights: ``float64[P]``."""
    archs = np.asarray(archs, np.int32).reshape(-1, *RNN_WS_SPACE.arch_shape)
    starts = self.score_starts(archs)
    cap = self.config.score_capacity
    out = []
    params = self.state['train'].params
    for begin in range(0, len(archs), cap):
      chunk, rows = archs[begin:begin + cap], starts[begin:begin + cap]
      n, pad = len(chunk), cap - len(chunk)
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.int32)])
      rows = np.concatenate([rows, np.zeros((pad,) + rows.shape[1:], np.int32)])
      nll = score_archs(params, chunk, rows, np.int32(n), self._valid,
                        model_config=self.model_config, bptt=self.score_bptt)
      out.append(_host_copy(nll, self.mesh).astype(np.float64)[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float64)

  def evaluate(self, archs: Sequence[np.ndarray] | np.ndarray) -> list[dict]:
    """One record per architecture: ``{'score': mean valid NLL, 'cost': seconds}``.

    The architectures not scored since the last training are scored together in one call;
    the others are answered from that (the weights have not changed).
    """
    archs = [RNN_WS_SPACE.validate(a).astype(np.int32) for a in archs]
    keys = [a.tobytes() for a in archs]
    todo, seen = [], set()
    for a, k in zip(archs, keys):
      if k not in self._cache and k not in seen:
        todo.append(a)
        seen.add(k)
    if todo:
      started = time.perf_counter()
      scores = self.score(np.stack(todo))
      cost = (time.perf_counter() - started) / len(todo)
      for a, s in zip(todo, scores):
        self._cache[a.tobytes()] = {'score': float(s), 'cost': cost}
      if self._writer is not None:
        self._writer.scalar('supernet/best_valid_nll', float(np.min(scores)), self.step)
        self._writer.flush()
    return [dict(self._cache[k]) for k in keys]

  # -- resume ------------------------------------------------------------------------------------

  def meta(self) -> dict[str, Any]:
    return {'step': self.step, 'epoch': self.epoch, 'window': self.window, 'round': self._round,
            'round_done': self._round_done, 'pool_digest': self._pool_digest,
            'prev_arch': self._prev_arch, 'seed': self.config.seed,
            'train_rows': len(self.train_data), 'batch_size': self.config.batch_size}

  def save(self) -> None:
    """Checkpoints the supernet under ``<workdir>/supernet`` (no-op without a workdir)."""
    if self._checkpointer is None:
      return
    if self._checkpointer.latest_step() == self.step:
      return  # the same position: the same state (deterministic)
    # The row-split hidden state cannot be read on one host: saved gathered (replicated).
    state = dict(self.state, hidden=parallel.gather(self.state['hidden'], self.mesh))
    self._checkpointer.save(self.step, state, self.meta())

  def _load(self, step: int) -> None:
    meta = self._checkpointer.restore_meta(step)
    cfg = self.config
    if (meta['seed'], meta['train_rows'], meta['batch_size']) != (
        cfg.seed, len(self.train_data), cfg.batch_size):
      raise ValueError(f'{self.workdir}/supernet holds a supernet of seed {meta["seed"]} with '
                       f'{meta["train_rows"]} rows of batch {meta["batch_size"]}; this config '
                       f'gives seed {cfg.seed}, {len(self.train_data)} rows of {cfg.batch_size}')
    # Restored onto the mesh with the shardings of the fresh state: parameters and optimizer
    # state replicated, the hidden state split by rows (every process reads its rows).
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {'train': self.state['train'], 'hidden': self.state['hidden']})
    template['rng'] = jax.random.key(cfg.seed)  # a concrete key: restored as a typed key
    state, meta = self._checkpointer.restore(step, template)
    # parallel.replicate: in a multi-process run, device_put refuses the restored (host-local)
    # key for a sharding over other processes' devices; it moves the key data instead.
    self.state = dict(state, rng=parallel.replicate(state['rng'], self.mesh))
    self._key = self.state['rng']
    self.step, self.epoch, self.window = int(meta['step']), int(meta['epoch']), int(meta['window'])
    self._round, self._round_done = int(meta['round']), bool(meta['round_done'])
    self._pool_digest = str(meta['pool_digest'])
    self._prev_arch = meta['prev_arch']
    self._cache.clear()

  def close(self) -> None:
    if self._checkpointer is not None:
      self._checkpointer.close()
    if self._writer is not None:
      self._writer.close()


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def resolve_config(config: Mapping[str, Any]) -> WsRnnConfig:
  """``WsRnnConfig`` from a search config's ``ws_rnn`` section (seed: the search's by default).

  Raises:
    ValueError: an unknown key (listing the known ones) or a bad value.
  """
  section = dict(config.get('ws_rnn', {}) or {})
  known = {f.name for f in dataclasses.fields(WsRnnConfig)}
  unknown = sorted(set(section) - known)
  if unknown:
    raise ValueError(f'unknown ws_rnn config key(s) {unknown}; known: {sorted(known)}')
  if 'seed' not in section and 'seed' in config:
    section['seed'] = int(config['seed'])
  return WsRnnConfig(**section)


def corpus_dir(cfg: WsRnnConfig) -> str:
  if cfg.data_dir:
    return cfg.data_dir
  root = os.environ.get('NAO_DATA_DIR')
  if not root:
    raise ValueError(f'no data: set ws_rnn.data_dir (a folder with the {cfg.dataset} '
                     'train/valid/test files) or $NAO_DATA_DIR')
  return os.path.join(root, cfg.dataset)


def from_config(config: Mapping[str, Any], workdir: str | None = None) -> WsRnnEvaluator:
  """The registry's builder: reads the corpus now, so a bad path fails before any work.

  Raises:
    ValueError: a bad config, or ``ws_rnn.batch_size`` not divisible by the device count
      (before the corpus is read).
  """
  cfg = resolve_config(config)
  mesh = data_mesh(cfg.batch_size)
  corpus = text.load_corpus(corpus_dir(cfg))
  return WsRnnEvaluator(cfg, corpus, workdir, mesh)


__all__ = ['WsRnnConfig', 'WsRnnEvaluator', 'score_archs', 'resolve_config', 'from_config',
           'data_mesh', 'SCORE_WINDOWS']
