"""Final (stand-alone) training of a recurrent cell on PTB / WikiText-2 (spec §6.8).

Two entry points, used by ``experiments/train_lm.py``, ``benchmarks/ptb_sanity.py``, notebooks
and tests::

    metrics = train_and_evaluate(config, workdir)   # trains or resumes; writes metrics.json
    metrics = evaluate_checkpoint(config, workdir)  # scores the best (or a given) checkpoint

``config`` is an ``ml_collections.ConfigDict`` (or dict) with the keys of ``default_config()``;
missing keys take those defaults, unknown keys are an error. The cell is a built-in name
(``arch = 'NAONet-PTB'``: NAO activation ids; ``'NAONet-WS-PTB'``: NAO-WS ids) or an official
string with its space (``arch_string = '0 1 ...'``, ``space = 'rnn_nao' | 'rnn_ws'``), so a cell
found by a search is retrained the same way.

**Recipes.** The default is the seed's (the supplementary material's ENAS setup): SGD at lr 10,
the rate of epoch ``e`` (1-based) is ``lr * 0.9991 ** max(0, e - 15)``, clip 0.25, L2 5e-7.
``train.schedule = 'nt_asgd'`` with ``lr = 20`` and ``weight_decay = 8e-7`` is the official NAO
code's DARTS/AWD-LSTM recipe (the ``:official`` variant of the config files). Both scale the
rate of a window by ``seq_len / bptt`` and use the variable-length BPTT sampler.

The run directory::

    config.json          the resolved config; a rerun with a different one is refused
    checkpoints/<step>   Orbax: params, optimizer state, NT-ASGD average, carried hidden state,
                         RNG key; JSON metadata: epoch, window in the epoch, step, valid-loss
                         history, NT-ASGD switch, best so far, rollbacks, wall time
    best/<step>          the best-valid state (same layout), scored at the end
    tb/                  TensorBoard: train/{loss,nll,ppl,grad_norm,lr,tok_per_s,rollbacks},
                         valid/{nll,ppl} per epoch, {valid,test}/best_ppl at the end
    metrics.json         final metrics (written once training has finished)
    eval_<step>.json     written by ``evaluate_checkpoint``

**Exact resume.** The windows of epoch ``e`` (their lengths) are drawn from
``default_rng([seed, 1, e, attempt])`` and the dropout key of step ``s`` is
``fold_in(fold_in(key, attempt), s)`` (``attempt`` = rollbacks so far); a checkpoint stores the
window reached within the epoch and the hidden state carried into it, so a killed and rerun
command ends with bit-identical parameters and perplexities on CPU. (The reference draws lengths
from one global numpy stream; per-epoch streams make the position a pair of integers.)

**Divergence.** Metrics are fetched every ``log_every_steps`` and the state is checked before
every save; a non-finite loss or state rolls training back to the newest good checkpoint
(``train.rollback_to = 'last'``; ``'best'`` is the reference's rollback to the best-valid model
on an exception) with fresh random streams (the reference's RNG also moves on), at most
``train.max_rollbacks`` times, then stops with ``DivergenceError`` naming the last good
checkpoint. A checkpoint of the initial state (step 0) is always written, so there is one.

**Devices.** Data parallel over every device of every process (``parallel.data_mesh``): the
``B = train.batch_size`` columns of each window and of the carried hidden state are split over
the devices (``train.batch_size`` must divide by their count), parameters, optimizer state and
key are replicated, and ``jit`` inserts the gradient all-reduce. In a multi-process run
(``--distributed``) every process reads the whole corpus and feeds its own columns
(``parallel.host_batch_slice``), all read the run directory, Orbax checkpoints are collective
(the hidden state is gathered to save it) and only the primary writes ``config.json``,
``metrics.json``, ``eval_<step>.json`` and TensorBoard. Validation and test split their columns
the same way when they divide, else every device scores all of them (the test batch of 1).

Data are time-major ``int32[T, B]`` throughout.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nao_jax.config_utils import check_choice, merge_sections
from nao_jax import parallel
from nao_jax import preemption
from nao_jax import spaces
from nao_jax.checkpoint import RunCheckpointer, write_json_atomic
from nao_jax.data import text
from nao_jax.progress import ScalarWriter
from nao_jax.rnn import model as model_lib
from nao_jax.rnn import train as train_lib

DATASETS = ('ptb', 'wikitext2')
RNN_SPACES = ('rnn_nao', 'rnn_ws')
SCHEDULES = ('exp_decay', 'nt_asgd')
ROLLBACK_TO = ('last', 'best')
OUTPUT_AVERAGES = ('exclude_s0', 'include_s0')
# Keys that may change when a run directory is resumed: none changes what is computed up to the
# point reached (``train.epochs`` extends a run: both schedules are functions of the epoch).
RESUME_TOLERATED_KEYS = ('train.max_steps', 'train.epochs', 'train.max_rollbacks', 'data_dir',
                         'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                         'evaluate_test')


class DivergenceError(RuntimeError):
  """Training kept producing non-finite values after ``train.max_rollbacks`` rollbacks."""


class _Diverged(Exception):
  """Internal: a non-finite value was seen; triggers a rollback."""


# -- config ---------------------------------------------------------------------------------------


def default_config() -> ml_collections.ConfigDict:
  """Every key the library reads; defaults are the seed recipe for the NAO PTB cell (spec §6.8).

  The experiment configs (``experiments/configs/naonet_*ptb.py``, ``naonet_wt2.py``) set every
  key explicitly; this is the schema they are checked against.
  """
  config = ml_collections.ConfigDict()
  config.seed = 1267                # NAO/rnn scripts
  # The cell: a built-in name, or an official string of `space` (then arch must be '').
  config.arch = 'NAONet-PTB'
  config.arch_string = ''
  config.space = ''                 # rnn_nao (0 tanh 1 relu 2 identity 3 sigmoid) | rnn_ws
  config.dataset = 'ptb'            # ptb | wikitext2: names $NAO_DATA_DIR/<dataset>
  config.data_dir = ''              # '' = $NAO_DATA_DIR/<dataset>
  config.train_tokens = 0           # use the first N training tokens (0: all); tests, benchmarks

  config.model = ml_collections.ConfigDict(dict(
      emb_size=850,                 # = hidden_size (tied decoder)
      hidden_size=850,
      dropout=0.75,                 # locked, on the cell outputs
      dropouth=0.25,                # on h_prev and every node input
      dropoutx=0.75,                # on x inside s0
      dropouti=0.2,                 # locked, on the embeddings
      dropoute=0.0,                 # whole embedding rows
      init_range=0.04,
      output_average='exclude_s0',  # final models: mean(s1..s11)
      fuse=True,                    # same function, one matmul per shared predecessor
  ))

  config.train = ml_collections.ConfigDict(dict(
      epochs=4000,                  # the seed gives none; NAO/rnn: 4000 PTB, 2000 WT2
      batch_size=64,
      eval_batch_size=10,
      test_batch_size=1,
      bptt=35,
      schedule='exp_decay',         # exp_decay (seed / ENAS) | nt_asgd (official NAO code)
      lr=10.0,                      # seed 10; official 20
      lr_decay=0.9991,              # exp_decay: per epoch ...
      lr_decay_start_epoch=15,      # ... after this (1-based) epoch
      nonmono=5,                    # nt_asgd: switch when worse than the best but the last 5
      clip=0.25,
      weight_decay=5e-7,            # seed 5e-7; official PTB 8e-7
      tar_beta=1e-3,
      ar_alpha=0.0,
      seq_p_full=0.95,              # BPTT sampler: base bptt w.p. 0.95, else bptt / 2 ...
      seq_std=5.0,                  # ... plus N(0, 5) jitter ...
      seq_min_len=5,                # ... floored at 5 ...
      seq_max_delta=20,             # ... and capped at bptt + 20
      pad_multiple=5,               # windows padded to a multiple of this (one program each)
      max_steps=0,                  # stop (with a checkpoint) after this many steps; 0: train on
      max_rollbacks=3,              # rollbacks after a non-finite loss before giving up
      rollback_to='last',           # last good checkpoint | best (the reference's model.pt)
  ))

  config.log_every_steps = 50
  config.checkpoint_every_steps = 0  # besides every epoch end; 0: epoch ends only
  config.keep_checkpoints = 2
  config.evaluate_test = True        # the final test perplexity (batch 1: slow on a CPU)
  return config


def resolve_config(config) -> ml_collections.FrozenConfigDict:
  """Merges ``config`` into ``default_config()`` and checks every value; no work is done.

  Raises:
    ValueError: an unknown key, a value out of range, an unknown or malformed architecture.
  """
  values = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  cfg = ml_collections.FrozenConfigDict(merge_sections(default_config().to_dict(), values, ''))
  check_choice('dataset', cfg.dataset, DATASETS)
  check_choice('train.schedule', cfg.train.schedule, SCHEDULES)
  check_choice('train.rollback_to', cfg.train.rollback_to, ROLLBACK_TO)
  check_choice('model.output_average', cfg.model.output_average, OUTPUT_AVERAGES)
  for name, value, low in (('train.epochs', cfg.train.epochs, 1),
                           ('train.batch_size', cfg.train.batch_size, 1),
                           ('train.eval_batch_size', cfg.train.eval_batch_size, 1),
                           ('train.test_batch_size', cfg.train.test_batch_size, 1),
                           ('train.bptt', cfg.train.bptt, 2),
                           ('train.lr_decay_start_epoch', cfg.train.lr_decay_start_epoch, 0),
                           ('train.nonmono', cfg.train.nonmono, 1),
                           ('train.seq_min_len', cfg.train.seq_min_len, 1),
                           ('train.seq_max_delta', cfg.train.seq_max_delta, 0),
                           ('train.pad_multiple', cfg.train.pad_multiple, 1),
                           ('train.max_steps', cfg.train.max_steps, 0),
                           ('train.max_rollbacks', cfg.train.max_rollbacks, 0),
                           ('model.emb_size', cfg.model.emb_size, 1),
                           ('model.hidden_size', cfg.model.hidden_size, 1),
                           ('train_tokens', cfg.train_tokens, 0),
                           ('log_every_steps', cfg.log_every_steps, 1),
                           ('checkpoint_every_steps', cfg.checkpoint_every_steps, 0),
                           ('keep_checkpoints', cfg.keep_checkpoints, 1)):
    if isinstance(value, bool) or int(value) != value or value < low:
      raise ValueError(f'{name} = {value!r}; expected an integer >= {low}')
  for name in ('dropout', 'dropouth', 'dropoutx', 'dropouti', 'dropoute'):
    if not 0.0 <= cfg.model[name] < 1.0:
      raise ValueError(f'model.{name} = {cfg.model[name]!r}; expected a rate in [0, 1)')
  if cfg.model.emb_size != cfg.model.hidden_size:
    raise ValueError(f'model.emb_size = {cfg.model.emb_size} != model.hidden_size = '
                     f'{cfg.model.hidden_size}: the decoder is tied to the embedding')
  for name in ('lr', 'clip', 'lr_decay'):
    if not cfg.train[name] > 0:
      raise ValueError(f'train.{name} = {cfg.train[name]!r}; expected a positive number')
  if not 0.0 <= cfg.train.seq_p_full <= 1.0 or cfg.train.seq_std < 0:
    raise ValueError(f'train.seq_p_full = {cfg.train.seq_p_full!r} must be in [0, 1] and '
                     f'train.seq_std = {cfg.train.seq_std!r} >= 0')
  build_arch(cfg)
  return cfg


def build_arch(cfg) -> tuple[spaces.RnnSpace, np.ndarray]:
  """``(space, int32[11, 2])`` from ``cfg.arch`` or ``cfg.arch_string`` + ``cfg.space``.

  The space carries the activation-id mapping the architecture is read with.
  """
  if cfg.arch_string:
    if cfg.arch:
      raise ValueError(f"set either arch ({cfg.arch!r}) or arch_string, not both "
                       "(--config.arch='' to use the string)")
    if cfg.space not in RNN_SPACES:
      raise ValueError(f'arch_string needs space = {" or ".join(RNN_SPACES)} (it fixes the '
                       f'activation ids), got {cfg.space!r}')
    space = spaces.get_space(cfg.space)
    return space, space.parse(cfg.arch_string)
  if not cfg.arch:
    raise ValueError('no architecture: set arch (a built-in name) or arch_string and space')
  space, arch = spaces.get_builtin(cfg.arch)
  if space.name not in RNN_SPACES:
    raise ValueError(f'arch {cfg.arch!r} is a {space.name} architecture, not an RNN cell')
  if cfg.space and cfg.space != space.name:
    raise ValueError(f'arch {cfg.arch!r} belongs to space {space.name!r}, config says '
                     f'{cfg.space!r}')
  return space, arch


def data_dir(cfg) -> str:
  """``cfg.data_dir``, else ``$NAO_DATA_DIR/<dataset>``."""
  if cfg.data_dir:
    return cfg.data_dir
  root = os.environ.get('NAO_DATA_DIR')
  if not root:
    raise ValueError(f'no data: set data_dir (a folder with the {cfg.dataset} train/valid/test '
                     'files) or $NAO_DATA_DIR')
  return os.path.join(root, cfg.dataset)


def model_config(cfg, vocab_size: int) -> model_lib.LMConfig:
  """The static model structure of ``cfg`` for a vocabulary of ``vocab_size`` words."""
  space, arch = build_arch(cfg)
  return model_lib.LMConfig(vocab_size=vocab_size, activations=space.activations,
                            arch=tuple(map(tuple, arch.tolist())), **dict(cfg.model))


def train_config(cfg) -> train_lib.TrainConfig:
  t = cfg.train
  return train_lib.TrainConfig(lr=float(t.lr), clip=float(t.clip),
                               weight_decay=float(t.weight_decay), tar_beta=float(t.tar_beta),
                               ar_alpha=float(t.ar_alpha), bptt=int(t.bptt))


def epoch_lr_factor(cfg, epoch: int) -> float:
  """Multiplier of ``train.lr`` in (0-based) epoch ``epoch``.

  ``exp_decay``: ``lr_decay ** max(0, (epoch + 1) - lr_decay_start_epoch)``: with 15, epochs
  1..15 run at ``lr`` and every later epoch at 0.9991 times the previous one (the seed: "decayed
  by a factor of 0.9991 after every epoch starting at epoch 15"). ``nt_asgd``: 1.
  """
  if cfg.train.schedule != 'exp_decay':
    return 1.0
  return float(cfg.train.lr_decay) ** max(0, epoch + 1 - int(cfg.train.lr_decay_start_epoch))


def epoch_windows(cfg, num_rows: int, epoch: int, attempt: int) -> list[tuple[int, int, float]]:
  """``[(start_row, seq_len, seq_len / bptt)]`` of one training epoch (a function of its args)."""
  t = cfg.train
  rng = np.random.default_rng([int(cfg.seed), 1, epoch, attempt])
  return list(text.iterate_bptt(num_rows, rng, int(t.bptt), max_delta=int(t.seq_max_delta),
                                std=float(t.seq_std), min_len=int(t.seq_min_len),
                                p_full=float(t.seq_p_full)))


# -- data -----------------------------------------------------------------------------------------


def load_data(cfg) -> tuple[text.Corpus, np.ndarray]:
  """The corpus and the batchified training stream ``int32[rows, batch_size]``."""
  corpus = text.load_corpus(data_dir(cfg))
  train_ids = corpus.train[:cfg.train_tokens] if cfg.train_tokens else corpus.train
  train = text.batchify(train_ids, cfg.train.batch_size)
  if len(train) < 3:
    raise ValueError(f'{len(train_ids)} training tokens give {len(train)} rows of batch '
                     f'{cfg.train.batch_size}; need at least 3')
  for split, batch in (('valid', cfg.train.eval_batch_size), ('test', cfg.train.test_batch_size)):
    if len(getattr(corpus, split)) < 2 * batch:
      raise ValueError(f'the {split} split has {len(getattr(corpus, split))} tokens, too few '
                       f'for batch {batch}')
  return corpus, train


# -- state ----------------------------------------------------------------------------------------


def data_mesh(batch_size: int) -> jax.sharding.Mesh:
  """The data mesh for ``train.batch_size`` columns (``parallel.column_mesh``)."""
  return parallel.column_mesh(batch_size, 'train.batch_size')


def _init_state(key: jax.Array, mcfg: model_lib.LMConfig, tcfg: train_lib.TrainConfig,
                batch_size: int) -> dict:
  params = model_lib.init_params(key, mcfg)
  return {'train': train_lib.init_train_state(params, tcfg),
          'hidden': model_lib.init_hidden(batch_size, mcfg), 'rng': key}


def _zero_hidden(batch_size: int, mcfg: model_lib.LMConfig, mesh) -> jax.Array:
  """``float32[B, H]`` zeros split over ``mesh`` by rows (each process makes its own rows)."""
  return parallel.split_zeros(batch_size, mcfg.hidden_size, mesh)


def _fresh_state(seed: int, mcfg, tcfg, batch_size: int, mesh) -> dict:
  """The initial state on ``mesh``: parameters and key replicated, hidden state split."""
  state = _init_state(jax.random.key(seed), mcfg, tcfg, batch_size)
  # Every process initialises from the same seed, so the replicated values agree.
  return {'train': parallel.replicate(state['train'], mesh),
          'rng': parallel.replicate(state['rng'], mesh),
          'hidden': _zero_hidden(batch_size, mcfg, mesh)}


def _savable(state: dict, mesh) -> dict:
  """The state with its hidden state gathered: a row-split array cannot be read on one host."""
  return dict(state, hidden=parallel.gather(state['hidden'], mesh))


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _restore(checkpointer: RunCheckpointer, step: int, mcfg, tcfg, batch_size: int,
             seed: int, mesh, split_hidden: bool = True) -> tuple[dict, dict]:
  """Restores a state onto ``mesh``; its pytree depends on whether NT-ASGD had started.

  Every process reads the checkpoint: parameters, optimizer state and key replicated, the hidden
  state split by rows (``split_hidden``; else replicated: evaluation only, any device count).
  """
  meta = checkpointer.restore_meta(step)
  abstract = jax.eval_shape(functools.partial(_init_state, mcfg=mcfg, tcfg=tcfg,
                                              batch_size=batch_size), jax.random.key(seed))
  if meta['asgd']:
    abstract['train'] = abstract['train']._replace(avg_params=abstract['train'].params)
  rep = parallel.replicated(mesh)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          abstract)
  if split_hidden:
    template['hidden'] = jax.ShapeDtypeStruct(abstract['hidden'].shape, abstract['hidden'].dtype,
                                              sharding=parallel.batch_sharding(mesh))
  template['rng'] = jax.random.key(seed)  # a concrete key: restored as a typed key
  state, meta = checkpointer.restore(step, template)
  # parallel.replicate: in a multi-process run, device_put refuses the restored (host-local) key
  # for a sharding over other processes' devices; it moves the key data instead.
  return dict(state, rng=parallel.replicate(state['rng'], mesh)), meta


def _drop_checkpoints_after(checkpointer: RunCheckpointer, step: int) -> None:
  """Removes the checkpoints newer than ``step`` (so that the newest one is the one to resume)."""
  for later in checkpointer.all_steps():
    if later > step:
      checkpointer.delete(later)


# -- evaluation -----------------------------------------------------------------------------------


def evaluate_split(params, ids: np.ndarray, batch_size: int, bptt: int,
                   mcfg: model_lib.LMConfig, mesh=None) -> dict[str, float]:
  """Mean NLL and perplexity of a token stream ``int[N]`` at ``batch_size`` columns.

  As the reference's ``evaluate``: windows of ``bptt``, hidden state carried, no dropout. With a
  ``mesh`` (``params`` replicated on it) the columns are split over its devices when they
  divide (``train.evaluate``).
  """
  return train_lib.evaluate(params, text.batchify(ids, batch_size), batch_size, bptt,
                            model_config=mcfg, mesh=mesh)


# -- run directory --------------------------------------------------------------------------------


def _config_diff(previous: dict, current: dict, prefix: str = '') -> list[str]:
  diffs = []
  for key in sorted(set(previous) | set(current)):
    name = prefix + key
    if name in RESUME_TOLERATED_KEYS:
      continue
    a, b = previous.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _config_diff(a, b, name + '.')
    elif a != b:
      diffs.append(f'{name}: {a!r} there, {b!r} now')
  return diffs


def _check_workdir_config(workdir: str, cfg, write: bool) -> None:
  path = os.path.join(workdir, 'config.json')
  current = json.loads(json.dumps(cfg.to_dict(), sort_keys=True))
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      previous = json.load(f)
    diff = _config_diff(previous, current)
    if diff:
      raise ValueError(f'{workdir} holds a run with a different config ({"; ".join(diff)}); use '
                       'a new --workdir or the original config')
  if write:
    write_json_atomic(path, current)


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s'


def _ckpt_name(checkpointer: RunCheckpointer, step: int | None) -> str:
  if step is None:
    return 'none'
  return f'step {step} in {checkpointer.directory}'


# -- training -------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the configured language model and scores it; returns ``metrics.json``.

  Order of work: check the config, the architecture and the data files (a bad value fails here,
  before anything is loaded); load the corpus; restore the newest checkpoint of ``workdir`` or
  initialise from ``config.seed`` (and checkpoint step 0); train epoch by epoch, logging every
  ``log_every_steps``, evaluating on the validation split (batch ``eval_batch_size``) after every
  epoch, keeping the best-valid state and checkpointing at every epoch end (and every
  ``checkpoint_every_steps``); finally score the best-valid state on valid and test (batch
  ``test_batch_size``) and write ``metrics.json``.

  Returns:
    ``metrics.json``'s content: ``valid_ppl``/``valid_nll`` and ``test_ppl``/``test_nll`` of the
    best-valid state, ``best_epoch``, ``last_valid_ppl``, ``params``, ``epochs``, ``steps``,
    ``train_tok_per_s`` (over all timed steps), ``rollbacks``, ``asgd_start_epoch``, ``wall_s``,
    ``seed``, ``arch`` (official string), ``space``, ``arch_name``, ``config``, ``finished``.
    After a ``max_steps`` stop ``finished`` is False and only the position and wall time are
    filled in.

  Raises:
    ValueError, FileNotFoundError: bad config or data, before any work.
    DivergenceError: non-finite values after ``train.max_rollbacks`` rollbacks; the newest
      checkpoint is the last good one.
  """
  cfg = resolve_config(config)
  text.find_split_files(data_dir(cfg))
  mesh = data_mesh(int(cfg.train.batch_size))
  os.makedirs(workdir, exist_ok=True)
  _check_workdir_config(workdir, cfg, write=parallel.is_primary())
  start_time = time.time()

  # -- data and program --------------------------------------------------------------------------
  # Every process reads the whole corpus and feeds its own columns of each training window.
  corpus, train_data = load_data(cfg)
  rows, batch = train_data.shape
  host_train = np.ascontiguousarray(train_data[:, parallel.host_batch_slice(batch, mesh)])
  mcfg, tcfg = model_config(cfg, corpus.vocab_size), train_config(cfg)
  space, arch = build_arch(cfg)
  epochs, bptt = int(cfg.train.epochs), int(cfg.train.bptt)
  pad = int(cfg.train.pad_multiple)
  num_params = model_lib.param_count(jax.eval_shape(
      functools.partial(model_lib.init_params, config=mcfg), jax.random.key(0)))
  checkpointer = RunCheckpointer(workdir, max_to_keep=cfg.keep_checkpoints)
  best_checkpointer = RunCheckpointer(workdir, max_to_keep=1, subdir='best')
  writer = ScalarWriter(os.path.join(workdir, 'tb'))
  metrics_path = os.path.join(workdir, 'metrics.json')

  def fresh_meta() -> dict:
    return {'step': 0, 'epoch': 0, 'window': 0, 'valid_history': [], 'asgd': False,
            'asgd_start_epoch': None, 'best_valid_nll': None, 'best_epoch': None,
            'best_step': None, 'rollbacks': 0, 'wall_s': 0.0, 'train_rows': rows,
            'batch_size': batch, 'timed_tokens': 0, 'timed_s': 0.0}

  # -- state: own checkpoint, else fresh from the seed (checkpointed as step 0) -------------------
  latest = checkpointer.latest_step()
  finished_before = os.path.exists(metrics_path)
  # Every process has seen the checkpoints and metrics.json before the primary writes.
  parallel.sync_processes('train_and_evaluate: run directory read')
  if latest is not None:
    state, meta = _restore(checkpointer, latest, mcfg, tcfg, batch, cfg.seed, mesh)
    if (meta['train_rows'], meta['batch_size']) != (rows, batch):
      raise ValueError(f'{workdir}: the checkpoint was written for {meta["train_rows"]} rows of '
                       f'batch {meta["batch_size"]}, the data now give {rows} rows of {batch}: '
                       'not the same data')
    logging.info('resuming %s from step %d (epoch %d, window %d)', workdir, meta['step'],
                 meta['epoch'] + 1, meta['window'])
    if meta['epoch'] >= epochs and finished_before:
      with open(metrics_path, encoding='utf-8') as f:
        logging.info('%s has finished already; metrics.json is unchanged', workdir)
        checkpointer.close()
        best_checkpointer.close()
        writer.close()
        return json.load(f)
  else:
    state = _fresh_state(cfg.seed, mcfg, tcfg, batch, mesh)
    meta = fresh_meta()
    checkpointer.save(0, _savable(state, mesh), meta)
  logging.info('%s (%s): %d parameters, vocabulary %d, %d training rows of batch %d on %d '
               'device(s), %d epochs, schedule %s lr %g', cfg.arch or 'arch_string',
               space.format(arch), num_params, corpus.vocab_size, rows, batch, mesh.size, epochs,
               cfg.train.schedule, cfg.train.lr)
  wall_before = float(meta['wall_s'])
  max_steps = int(cfg.train.max_steps)
  ckpt_every = int(cfg.checkpoint_every_steps)
  # Throughput: of the steps since the last log line (progress lines, TensorBoard) and of all
  # timed steps of the run (metrics.json); compilation, evaluation and saving are not timed.
  progress = {'tokens': 0, 'start': None, 'tok_per_s': 0.0,
              'timed_tokens': int(meta['timed_tokens']), 'timed_s': float(meta['timed_s'])}

  def save(target: RunCheckpointer, state: dict, meta: dict) -> None:
    if not bool(_all_finite(state['train'])):
      raise _Diverged(f'the state after step {meta["step"]} holds non-finite values')
    meta = dict(meta, wall_s=wall_before + time.time() - start_time,
                timed_tokens=progress['timed_tokens'], timed_s=progress['timed_s'])
    # A step saved before a kill (best-valid state, then killed before the epoch checkpoint) is
    # written again by the replay: replace it.
    _drop_checkpoints_after(target, meta['step'] - 1)
    target.save(meta['step'], _savable(state, mesh), meta)

  def flush(pending: list, meta: dict, epoch_len: int) -> None:
    """Fetches step metrics, stops on non-finite ones, logs progress and TensorBoard scalars."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not all(np.isfinite(v) for v in m.values()):
        raise _Diverged(f'loss {m["loss"]} at step {s}')
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    step = meta['step']
    if progress['start'] is not None and progress['tokens']:
      elapsed = time.time() - progress['start']
      progress['tok_per_s'] = progress['tokens'] / max(elapsed, 1e-9)
      progress['timed_tokens'] += progress['tokens']
      progress['timed_s'] += elapsed
      writer.scalar('train/tok_per_s', progress['tok_per_s'], step)
    steps_left = (epochs - meta['epoch']) * epoch_len - meta['window']
    if max_steps:
      steps_left = min(steps_left, max_steps - step)
    tok_per_step = bptt * batch
    eta = (steps_left * tok_per_step / progress['tok_per_s'] if progress['tok_per_s']
           else float('inf'))
    lr = float(cfg.train.lr) * epoch_lr_factor(cfg, meta['epoch'])
    for k, v in means.items():
      writer.scalar(f'train/{k}', v, step)
    writer.scalar('train/ppl', math.exp(min(means['nll'], 50.0)), step)
    writer.scalar('train/lr', lr, step)
    logging.info('epoch %d/%d window %d/%d step %d: %.0f tok/s, ETA %s; loss %.4f ppl %.2f '
                 'grad_norm %.3f lr %.4g%s', meta['epoch'] + 1, epochs, meta['window'], epoch_len,
                 step, progress['tok_per_s'], _duration(eta), means['loss'],
                 math.exp(min(means['nll'], 50.0)), means['grad_norm'], lr,
                 ' (ASGD)' if meta['asgd'] else '')
    pending.clear()
    restart_clock()  # the rate is of the steps since the previous line (fetched: synchronised)

  def restart_clock(ready=None) -> None:
    """Throughput never counts compilation, evaluation or checkpoint writes."""
    if ready is not None:
      jax.block_until_ready(ready)
    progress['start'], progress['tokens'] = time.time(), 0

  def run_epoch_end(state: dict, meta: dict) -> tuple[dict, dict]:
    """Validation, NT-ASGD switch, best-valid state, epoch checkpoint (spec §6.8)."""
    epoch = meta['epoch']
    params = train_lib.eval_params(state['train'])
    valid = evaluate_split(params, corpus.valid, cfg.train.eval_batch_size, bptt, mcfg, mesh)
    if not np.isfinite(valid['nll']):
      raise _Diverged(f'valid loss {valid["nll"]} after epoch {epoch + 1}')
    writer.scalar('valid/nll', valid['nll'], meta['step'])
    writer.scalar('valid/ppl', valid['ppl'], meta['step'])
    improved = meta['best_valid_nll'] is None or valid['nll'] < meta['best_valid_nll']
    logging.info('epoch %d/%d: valid ppl %.2f (nll %.4f)%s', epoch + 1, epochs, valid['ppl'],
                 valid['nll'], ' best' if improved else '')
    history = list(meta['valid_history'])
    meta = dict(meta, epoch=epoch + 1, window=0, last_valid_nll=valid['nll'])
    if improved:
      meta.update(best_valid_nll=valid['nll'], best_epoch=epoch + 1, best_step=meta['step'])
    if (cfg.train.schedule == 'nt_asgd' and not meta['asgd']
        and train_lib.nt_asgd_should_switch(history, valid['nll'], int(cfg.train.nonmono))):
      logging.info('epoch %d: valid loss %.4f is worse than the best before the last %d epochs: '
                   'switching to averaged SGD', epoch + 1, valid['nll'], cfg.train.nonmono)
      state = dict(state, train=train_lib.start_averaging(state['train']))
      meta.update(asgd=True, asgd_start_epoch=epoch + 1)
    meta['valid_history'] = history + [valid['nll']]
    # The next epoch starts from a zero hidden state (as the reference's train()).
    state = dict(state, hidden=_zero_hidden(batch, mcfg, mesh))
    if improved:
      save(best_checkpointer, state, meta)
    save(checkpointer, state, meta)
    return state, meta

  def train_until_done(state: dict, meta: dict) -> tuple[dict, dict]:
    key = state['rng']
    while meta['epoch'] < epochs:
      epoch, attempt = meta['epoch'], meta['rollbacks']
      windows = epoch_windows(cfg, rows, epoch, attempt)
      lr_factor = epoch_lr_factor(cfg, epoch)
      step_key = jax.random.fold_in(key, attempt)
      pending: list = []
      hidden, train_state = state['hidden'], state['train']
      first = True
      for w in range(meta['window'], len(windows)):
        if max_steps and meta['step'] >= max_steps:
          break
        start, seq_len, seq_scale = windows[w]
        inputs, targets, length = train_lib.pad_window(*text.get_batch(host_train, start,
                                                                       seq_len), pad)
        inputs, targets = parallel.global_batch((inputs, targets), mesh, axis=1)
        train_state, hidden, metrics = train_lib.train_step(
            train_state, inputs, targets, hidden, jax.random.fold_in(step_key, meta['step']),
            np.float32(seq_scale * lr_factor), length, model_config=mcfg, train_config=tcfg)
        meta = dict(meta, step=meta['step'] + 1, window=w + 1)
        pending.append((meta['step'], metrics))
        state = dict(state, train=train_state, hidden=hidden)
        if first:  # the first step of a process or after an evaluation may compile: not timed
          restart_clock(metrics)
          first = False
        else:
          progress['tokens'] += int(length) * batch
        at_ckpt = ckpt_every and meta['step'] % ckpt_every == 0 and w + 1 < len(windows)
        at_stop = max_steps and meta['step'] >= max_steps
        if meta['step'] % cfg.log_every_steps == 0 or at_ckpt or at_stop:
          flush(pending, meta, len(windows))
        saved = at_ckpt or (at_stop and w + 1 < len(windows))
        if saved:
          save(checkpointer, state, meta)
          restart_clock()
        # A preemption notice (SIGTERM) mid-epoch: the mid-epoch checkpoint above (window and
        # carried hidden state), then stop; at the epoch's last window, after the epoch end.
        if w + 1 < len(windows) and not at_stop and preemption.requested(meta['step']):
          flush(pending, meta, len(windows))
          if not saved:
            save(checkpointer, state, meta)
          raise preemption.Preempted(meta['step'])
      flush(pending, meta, len(windows))
      if meta['window'] < len(windows):  # max_steps reached inside the epoch
        return state, meta
      state, meta = run_epoch_end(state, meta)  # checkpoints the epoch end
      if max_steps and meta['step'] >= max_steps:
        return state, meta
      if meta['epoch'] < epochs and preemption.requested(meta['step']):
        raise preemption.Preempted(meta['step'])
    return state, meta

  # -- train, rolling back on divergence ---------------------------------------------------------
  try:
    while True:
      try:
        with preemption.watching():  # SIGTERM sets a flag checked after every step
          state, meta = train_until_done(state, meta)
        break
      except _Diverged as e:
        rollbacks = meta['rollbacks'] + 1
        target = checkpointer
        if cfg.train.rollback_to == 'best' and best_checkpointer.latest_step() is not None:
          target = best_checkpointer
        good = target.latest_step()
        if rollbacks > cfg.train.max_rollbacks:
          raise DivergenceError(
              f'training diverged ({e}) after {rollbacks - 1} rollback(s) (train.max_rollbacks = '
              f'{cfg.train.max_rollbacks}); the last good checkpoint is '
              f'{_ckpt_name(target, good)}; lower train.lr or check the data') from None
        state, meta = _restore(target, good, mcfg, tcfg, batch, cfg.seed, mesh)
        if target is best_checkpointer:
          _drop_checkpoints_after(checkpointer, good)
        logging.warning('training diverged (%s): rollback %d of at most %d to %s (epoch %d, '
                        'window %d) with fresh random streams', e, rollbacks,
                        cfg.train.max_rollbacks, _ckpt_name(target, good), meta['epoch'] + 1,
                        meta['window'])
        meta = dict(meta, rollbacks=rollbacks)
        writer.scalar('train/rollbacks', rollbacks, meta['step'])

    finished = meta['epoch'] >= epochs
    result = {'step': meta['step'], 'epoch': meta['epoch'], 'window': meta['window'],
              'finished': finished, 'rollbacks': meta['rollbacks'],
              'train_tok_per_s': progress['timed_tokens'] / max(progress['timed_s'], 1e-9),
              'params': num_params,
              'arch': space.format(arch), 'arch_name': cfg.arch, 'space': space.name,
              'seed': cfg.seed}
    if not finished:
      result['wall_s'] = wall_before + time.time() - start_time
      logging.info('%s: stopped at step %d (epoch %d, window %d); rerun to continue', workdir,
                   meta['step'], meta['epoch'] + 1, meta['window'])
      return result

    # -- final evaluation of the best-valid state ------------------------------------------------
    best_step = best_checkpointer.latest_step()
    best_state, best_meta = _restore(best_checkpointer, best_step, mcfg, tcfg, batch, cfg.seed,
                                     mesh)
    params = train_lib.eval_params(best_state['train'])
    valid = evaluate_split(params, corpus.valid, cfg.train.eval_batch_size, bptt, mcfg, mesh)
    test = (evaluate_split(params, corpus.test, cfg.train.test_batch_size, bptt, mcfg, mesh)
            if cfg.evaluate_test else {'nll': None, 'ppl': None})
    for split, values in (('valid', valid), ('test', test)):
      if values['nll'] is not None:
        writer.scalar(f'{split}/best_ppl', values['ppl'], meta['step'])
  finally:
    writer.close()
    checkpointer.close()
    best_checkpointer.close()
  result.update({
      'valid_nll': valid['nll'], 'valid_ppl': valid['ppl'], 'test_nll': test['nll'],
      'test_ppl': test['ppl'], 'best_epoch': best_meta['best_epoch'], 'best_step': best_step,
      'last_valid_ppl': math.exp(meta['last_valid_nll']), 'epochs': meta['epoch'],
      'steps': meta['step'], 'asgd_start_epoch': meta['asgd_start_epoch'],
      'eval_batch_size': cfg.train.eval_batch_size,
      'test_batch_size': cfg.train.test_batch_size, 'vocab_size': corpus.vocab_size,
      'wall_s': wall_before + time.time() - start_time, 'config': cfg.to_dict(),
  })
  if parallel.is_primary():
    write_json_atomic(metrics_path, result)
  logging.info('%s: best valid ppl %.2f (epoch %d), test ppl %s', workdir, valid['ppl'],
               best_meta['best_epoch'],
               f'{test["ppl"]:.2f}' if test['ppl'] is not None else 'not evaluated')
  return result



def evaluate_checkpoint(config, workdir: str, step: int | None = None,
                        which: str = 'best') -> dict[str, Any]:
  """Scores a checkpoint of ``workdir`` on valid (eval batch) and test (test batch).

  Args:
    config: the run's config (``None``: the ``config.json`` of ``workdir``); keys that change the
      model or the data must match the run's.
    workdir: a run directory of ``train_and_evaluate``.
    step: the checkpoint step; None for the newest of ``which``.
    which: ``'best'`` (the best-valid state) or ``'last'`` (the regular checkpoints).

  Returns:
    ``valid_nll``, ``valid_ppl``, ``test_nll``, ``test_ppl``, ``step``, ``epoch``, ``arch``,
    ``space``, ``which``; also written to ``workdir/eval_<step>.json``. NT-ASGD states are
    scored with their averaged weights.
  """
  if which not in ('best', 'last'):
    raise ValueError(f"which = {which!r}; choose 'best' or 'last'")
  if config is None:
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: is {workdir} a training run directory?')
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  cfg = resolve_config(config)
  text.find_split_files(data_dir(cfg))
  subdir = 'best' if which == 'best' else 'checkpoints'
  if not os.path.isdir(os.path.join(workdir, subdir)):
    raise FileNotFoundError(f'{workdir} has no {subdir}/')
  _check_workdir_config(workdir, cfg, write=False)
  checkpointer = RunCheckpointer(workdir, max_to_keep=cfg.keep_checkpoints, subdir=subdir)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f'{workdir}/{subdir} holds no checkpoint')
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f'no {which} checkpoint of step {step} in {workdir}; there are {steps}')
    corpus, train_data = load_data(cfg)
    mcfg, tcfg = model_config(cfg, corpus.vocab_size), train_config(cfg)
    # Scoring needs no training batch split: the hidden state is restored replicated, so any
    # device count can score a checkpoint.
    mesh = parallel.data_mesh()
    state, meta = _restore(checkpointer, step, mcfg, tcfg, train_data.shape[1], cfg.seed, mesh,
                           split_hidden=False)
  finally:
    checkpointer.close()
  params = train_lib.eval_params(state['train'])
  bptt = int(cfg.train.bptt)
  valid = evaluate_split(params, corpus.valid, cfg.train.eval_batch_size, bptt, mcfg, mesh)
  test = evaluate_split(params, corpus.test, cfg.train.test_batch_size, bptt, mcfg, mesh)
  space, arch = build_arch(cfg)
  result = {'valid_nll': valid['nll'], 'valid_ppl': valid['ppl'], 'test_nll': test['nll'],
            'test_ppl': test['ppl'], 'step': step, 'epoch': meta['epoch'],
            'arch': space.format(arch), 'space': space.name, 'which': which}
  if parallel.is_primary():
    write_json_atomic(os.path.join(workdir, f'eval_{step}.json'), result)
  logging.info('%s %s step %d: valid ppl %.2f, test ppl %.2f', workdir, which, step,
               valid['ppl'], test['ppl'])
  return result


__all__ = ['DivergenceError', 'default_config', 'resolve_config', 'build_arch', 'data_dir',
           'model_config', 'train_config', 'epoch_lr_factor', 'epoch_windows', 'load_data',
           'evaluate_split', 'data_mesh', 'train_and_evaluate', 'evaluate_checkpoint']
