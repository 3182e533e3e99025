"""The NAO search loop (spec §1, §4.3, §11.4).

Each round: score the pool, normalise the scores, train the controller, propose new
architectures from the top-K with the embedding-space step, evaluate them, and update the pool
by a named policy. The state at the start of every round (pool, controller, random streams) is
checkpointed, and evaluations inside a round are served from the history on a rerun, so a
killed search continues exactly where it stopped.

Pool policies:

* ``replace_worst`` (PT-V1): keep the best ``pool_size - n_new`` and add the new ones;
* ``replace_worst_with_random`` (TF-WS): keep the best ``pool_size - n_new - num_random``, add
  the new ones and ``num_random`` fresh random architectures;
* ``keep_all`` (NAO-V2's cumulative evaluation pool): every evaluated architecture stays.
"""

from __future__ import annotations

import dataclasses
import time

from absl import logging
import jax
import numpy as np

from nao_jax import metrics
from nao_jax import parallel
from nao_jax.checkpoint import RunCheckpointer
from nao_jax.controller import (ControllerConfig, capacity_for, init_controller,
                                normalize_targets, pad_pool, predict_in_chunks, propose,
                                reset_optimizer, train_epochs)
from nao_jax.search.baselines import sample_unseen
from nao_jax.search.run import SearchRun

POOL_POLICIES = ('replace_worst', 'replace_worst_with_random', 'keep_all')


@dataclasses.dataclass(frozen=True)
class NaoSearchConfig:
  """Loop settings; defaults are PT-V1's (spec §4.2, §4.3).

  Attributes:
    seed_pool_size: random architectures evaluated before the first round.
    pool_size: pool size kept by the replace policies (0: ``seed_pool_size``).
    top_k: seeds of the embedding-space step (best first).
    num_new: new architectures proposed per round (at most).
    eta_max, eta_step: step sizes ``eta_step, 2 eta_step, ... <= eta_max``.
    eta_chunk: step sizes decoded per compiled call.
    pool_policy: one of ``POOL_POLICIES``.
    num_random: random architectures injected per round by ``replace_worst_with_random``.
    fill_with_random: when the controller proposes fewer than ``num_new`` unseen architectures,
      fill the round with random unseen ones (keeps a tabular search spending its budget; the
      official code would simply add fewer).
    rounds: stop after this many proposal rounds (0: until the budget is spent).
    exclude: ``'evaluated'`` never proposes anything evaluated before in this run; ``'pool'``
      only excludes the current pool (the official rule).
    candidates_per_new: decode ``ceil(candidates_per_new * n)`` unseen candidates for the ``n``
      places of a round and evaluate the ``n`` the predictor likes best. 1.0 is the official
      behaviour (evaluate every decoded architecture); larger values spend controller compute
      (cheap) to save evaluations (expensive), using the predictor the controller trains anyway.
    warm_epochs: controller epochs of the rounds after the first when the controller is warm
      started (0: ``controller.epochs`` every round, as the official code). A warm controller
      already fits most of the pool, so small tabular searches can spend less time per round.
    unlabeled: random architectures added to every controller training as reconstruction-only
      rows (no score, no query): the encoder and decoder then learn the whole space rather than
      the few evaluated architectures, as in SemiNAS (Luo et al. 2020), which extends NAO with
      unlabeled architectures. 0 (official NAO) trains on the evaluated pool only. Drawn once
      per search from the seed, so a resumed search uses the same ones.
    mutations_per_round: this many of a round's places go to the predictor's favourites among
      the unseen one-edit neighbours (``SearchSpace.neighbours``) of the ``top_k`` seeds, the
      rest to the embedding step's decodes as usual; places the decodes cannot fill also go to
      neighbours before random architectures. A neighbour the step also decoded competes as a
      decode only. Recorded with source ``'mutation'``. 0 (official NAO) evaluates decodes
      only. A deviation from NAO's generator, for long tabular searches:
      each seed follows a single gradient direction, and late in a search the step stops
      reaching the one better neighbour of the best architectures even when the predictor
      ranks it near the top (benchmarks/README.md, NAS-Bench-201).
    screened_per_round: this many of a round's places go to the predictor's favourites among
      ``screen_candidates`` uniformly random unseen architectures (source ``'screened'``),
      before any random fill; a round with fewer places than asked for (the budget's end)
      fills screened places first, then mutations, then decodes. The step and the mutations
      both start from the ``top_k`` best architectures; this exploration does not, so a search
      that has settled around one local optimum can still reach another region the predictor
      likes. 0 (official NAO) screens nothing. A deviation from NAO's generator (predictor-
      ranked random candidates, one of the acquisition optimizers BANANAS compares).
    screen_candidates: random architectures drawn per round for ``screened_per_round``.
    screen_min_edits: screened candidates differ from each of the round's ``num_new`` best
      architectures in at least this many fields of the architecture array (0: no
      constraint; NAS-Bench-201 has 6, one op per edge), so that exploration leaves the
      region the search is in rather than ranking the best's near neighbours first.
    rerank_top: with a non-stationary evaluator (a supernet) that can ``rerank``, the best
      ``rerank_top`` architectures of the last round are re-scored by it at the end (PT-V1:
      top 5 by short stand-alone training) and the best of those is the result.
  """
  seed_pool_size: int = 600
  pool_size: int = 0
  top_k: int = 100
  num_new: int = 300
  eta_max: float = 50.0
  eta_step: float = 1.0
  eta_chunk: int = 5
  pool_policy: str = 'replace_worst'
  num_random: int = 50
  fill_with_random: bool = True
  rounds: int = 0
  exclude: str = 'evaluated'
  candidates_per_new: float = 1.0
  rerank_top: int = 5
  warm_epochs: int = 0
  unlabeled: int = 0
  mutations_per_round: int = 0
  screened_per_round: int = 0
  screen_candidates: int = 1000
  screen_min_edits: int = 0

  def __post_init__(self):
    if self.pool_policy not in POOL_POLICIES:
      raise ValueError(f'nao.pool_policy = {self.pool_policy!r}; choose one of {POOL_POLICIES}')
    if self.exclude not in ('evaluated', 'pool'):
      raise ValueError(f"nao.exclude must be 'evaluated' or 'pool', got {self.exclude!r}")
    for field in ('unlabeled', 'mutations_per_round', 'screened_per_round', 'screen_min_edits'):
      if getattr(self, field) < 0:
        raise ValueError(f'nao.{field} must be >= 0, got {getattr(self, field)}')
    for field in ('seed_pool_size', 'top_k', 'num_new', 'eta_chunk', 'screen_candidates'):
      if getattr(self, field) < 1:
        raise ValueError(f'nao.{field} must be >= 1, got {getattr(self, field)}')
    if self.candidates_per_new < 1.0:
      raise ValueError(f'nao.candidates_per_new must be >= 1, got {self.candidates_per_new}')
    if self.eta_max <= 0 or self.eta_step <= 0:
      raise ValueError(f'nao.eta_max and nao.eta_step must be > 0, got {self.eta_max}, '
                       f'{self.eta_step}')

  @property
  def target_pool_size(self) -> int:
    return self.pool_size or self.seed_pool_size


def nao_search(run: SearchRun, cfg: NaoSearchConfig, controller_cfg: ControllerConfig,
               seed: int) -> int:
  """Runs NAO until the budget or the round limit; returns the number of rounds completed."""
  if run.budget < cfg.seed_pool_size:
    raise ValueError(f'budget {run.budget} is smaller than the seed pool '
                     f'(nao.seed_pool_size = {cfg.seed_pool_size})')
  space = run.space
  checkpointer = RunCheckpointer(run.workdir, subdir='search_state')
  max_pool = run.budget if cfg.pool_policy == 'keep_all' else cfg.target_pool_size + cfg.num_new
  capacity = capacity_for(max_pool + cfg.unlabeled, controller_cfg.batch_size)
  # Its own stream, so that the search's random architectures do not depend on this setting.
  unlabeled = space.sample(np.random.default_rng([seed, 1]), cfg.unlabeled)
  swaps = np.asarray(space.swap_permutations(), np.int32)
  mesh = _controller_mesh(controller_cfg)
  template = {'controller': _place(init_controller(controller_cfg, jax.random.key(seed)), mesh),
              'key': jax.random.key(seed)}
  step = checkpointer.latest_step()
  if step is None:
    rng = np.random.default_rng(seed)
    pool = _distinct_random(run, rng, cfg.seed_pool_size)
    round_index, state = 0, template
    checkpointer.save(0, state, _meta(0, pool, rng, run.queries))
  else:
    state, meta = checkpointer.restore(step, template)
    round_index, pool = meta['round'], np.asarray(meta['pool'], np.int32)
    rng = np.random.default_rng()
    rng.bit_generator.state = meta['rng_state']
    if run.evaluator.stationary:
      run.fast_forward(meta['queries'])
    else:
      run.restore_scored(before_round=round_index)
      run.reserve(pool)
    logging.info('resuming the NAO search at round %d (pool of %d)', round_index, len(pool))

  stationary = run.evaluator.stationary
  while True:
    run.evaluator.start_round(pool, round_index)
    if stationary:
      scores = run.query(pool, round_index, 'pool')
    else:  # a supernet's scores move with its weights: score the whole pool every round
      scores = run.score_round(pool, round_index)
    if run.remaining == 0 or (cfg.rounds and round_index >= cfg.rounds):
      break
    started = time.time()
    order = np.argsort(-scores if run.evaluator.higher_is_better else scores, kind='stable')
    pool, scores = pool[order], scores[order]
    targets, direction = normalize_targets(scores, run.evaluator.higher_is_better,
                                           controller_cfg.target_orientation,
                                           controller_cfg.target_transform)
    epochs = controller_cfg.epochs
    if round_index > 0 and controller_cfg.warm_start and cfg.warm_epochs:
      epochs = cfg.warm_epochs
    controller, stats = _train_controller(state['controller'], controller_cfg, space, pool,
                                          targets, unlabeled, capacity, swaps, state['key'],
                                          round_index, epochs, mesh)
    params = _local_copy(controller.params, mesh)
    seen = run.known_keys() if cfg.exclude == 'evaluated' else set()
    seen |= {space.canonical_key(a) for a in pool}
    quota = min(cfg.num_new, run.remaining)
    proposal = propose(params, controller_cfg, space, pool[:cfg.top_k], seen,
                       int(np.ceil(quota * cfg.candidates_per_new)), cfg.eta_max, direction,
                       cfg.eta_step, cfg.eta_chunk, seed_capacity=cfg.top_k)
    decoded = list(proposal.archs)
    new = [decoded[i] for i in _best_predicted(
        params, controller_cfg, space, decoded,
        max(quota - cfg.mutations_per_round - cfg.screened_per_round, 0), direction)]
    mutated = []
    if cfg.mutations_per_round:
      neighbours = _unseen_neighbours(space, pool[:cfg.top_k],
                                      seen | {space.canonical_key(a) for a in decoded})
      mutated = [neighbours[i] for i in _best_predicted(
          params, controller_cfg, space, neighbours,
          quota - cfg.screened_per_round - len(new), direction)]
    screened = []
    if cfg.screened_per_round:
      candidates = _unseen(space, space.sample(rng, cfg.screen_candidates),
                           seen | {space.canonical_key(a) for a in decoded + mutated})
      candidates = _far_from(candidates, pool[:cfg.num_new], cfg.screen_min_edits)
      screened = [candidates[i] for i in _best_predicted(
          params, controller_cfg, space, candidates, quota - len(new) - len(mutated),
          direction)]
    chosen = new + mutated + screened
    randoms = _random_archs(cfg, run, rng, seen | {space.canonical_key(a) for a in chosen},
                            quota, len(chosen))
    if stationary:  # evaluate now; a supernet scores them with the pool next round
      for archs, source in ((new, 'nao'), (mutated, 'mutation'), (screened, 'screened'),
                            (randoms, 'random')):
        if archs:
          run.query(archs, round_index, source)
    else:
      run.reserve(chosen + randoms)
    predicted = predict_in_chunks(params, controller_cfg, space.to_tokens(pool))
    logging.info('round %d: controller loss %.4f (mse %.4f, ce %.4f), pool pairwise acc %.3f; '
                 'proposed %d (eta <= %g), mutations %d, screened %d, random %d; best %.4f; '
                 '%.1fs', round_index, stats['loss'], stats['mse'], stats['ce'],
                 metrics.pairwise_accuracy(targets, np.asarray(predicted)), len(new),
                 proposal.max_eta, len(mutated), len(screened), len(randoms),
                 run.best_record['score'],
                 time.time() - started)
    for name, value in stats.items():
      run.writer.scalar(f'controller/{name}', value, round_index)
    pool = _update_pool(cfg, pool, chosen + randoms)
    round_index += 1
    state = {'controller': controller, 'key': state['key']}
    checkpointer.save(round_index, state, _meta(round_index, pool, rng, run.queries))
    run.write_results(round_index, finished=False, extra={'searcher': 'nao'})
  checkpointer.close()
  if not stationary and cfg.rerank_top and hasattr(run.evaluator, 'rerank'):
    order = np.argsort(-scores if run.evaluator.higher_is_better else scores, kind='stable')
    run.rerank(pool[order[:cfg.rerank_top]])
  return round_index


def _random_archs(cfg: NaoSearchConfig, run: SearchRun, rng: np.random.Generator, taken: set,
                  quota: int, n_proposed: int) -> list[np.ndarray]:
  """Random unseen architectures injected this round (TF policy) or filling a short round."""
  n_random = cfg.num_random if cfg.pool_policy == 'replace_worst_with_random' else 0
  n_random = min(n_random, run.remaining - n_proposed)
  if cfg.fill_with_random:
    n_random = max(n_random, min(quota, run.remaining) - n_proposed)
  archs = []
  for _ in range(max(n_random, 0)):
    arch = sample_unseen(run, rng, exclude=taken)
    taken.add(run.space.canonical_key(arch))
    archs.append(arch)
  return archs


def _controller_mesh(cfg: ControllerConfig):
  """A data mesh over every device of every process for the controller's minibatches.

  ``None`` (one device) when there is a single device, or when ``cfg.batch_size`` does not split
  evenly over the devices (then every device repeats the whole minibatch, as before).
  """
  if jax.device_count() == 1:
    return None
  if cfg.batch_size % jax.device_count():
    logging.warning('controller.batch_size %d does not split over %d devices: the controller '
                    'trains on one device per process', cfg.batch_size, jax.device_count())
    return None
  return parallel.data_mesh()


def _place(tree, mesh):
  """``tree`` replicated over ``mesh`` (unchanged without one)."""
  return tree if mesh is None else parallel.replicate(tree, mesh)


def _local_copy(tree, mesh):
  """This process's copy of replicated arrays, for the single-device proposal programs."""
  return tree if mesh is None else jax.tree.map(lambda x: x.addressable_data(0), tree)


def _train_controller(controller, cfg: ControllerConfig, space, pool, targets, unlabeled,
                      capacity, swaps, key, round_index, epochs, mesh=None):
  """Fresh or warm-started controller trained on the sorted pool; returns (state, stats).

  ``unlabeled`` architectures (``int32[M, L]``, possibly empty) join as rows with a NaN target,
  which the loss counts for reconstruction only. With a ``mesh`` every minibatch is split over
  its devices (data parallel over all processes) and the controller stays replicated.
  """
  round_key = jax.random.fold_in(key, round_index)
  if round_index == 0 or not cfg.warm_start:
    controller = _place(init_controller(cfg, jax.random.fold_in(round_key, 0)), mesh)
  elif not cfg.keep_optimizer_state:
    controller = reset_optimizer(cfg, controller)
  if len(unlabeled):
    pool = np.concatenate([pool, unlabeled])
    targets = np.concatenate([targets, np.full(len(unlabeled), np.nan, np.float32)])
  tokens, padded_targets, valid = pad_pool(space.to_tokens(pool), targets, capacity)
  arrays = (tokens, padded_targets, valid, swaps, np.int32(epochs))
  if mesh is not None:
    # Every process holds the same pool; device_put's cross-process equality check would
    # refuse the NaN targets of unlabeled rows (NaN != NaN), so the copies are placed directly.
    arrays = tuple(jax.make_array_from_process_local_data(parallel.replicated(mesh), np.asarray(a))
                   for a in arrays)
  key = _place(jax.random.fold_in(round_key, 1), mesh)
  controller, stats = train_epochs(controller, cfg, *arrays, key, mesh=mesh)
  return controller, {k: float(_local_copy(v, mesh)) for k, v in stats.items()}


def _best_predicted(params, cfg: ControllerConfig, space, archs: list[np.ndarray], n: int,
                    direction: int) -> np.ndarray:
  """Indices of the ``n`` candidates with the best predicted scores, ascending."""
  if n <= 0:
    return np.arange(0)
  if len(archs) <= n:
    return np.arange(len(archs))
  predicted = predict_in_chunks(params, cfg, space.to_tokens(np.stack(archs)))
  return np.sort(np.argsort(-direction * predicted, kind='stable')[:n])


def _unseen(space, candidates, taken: set) -> list[np.ndarray]:
  """The distinct ``candidates`` (an iterable of architectures) whose canonical keys are not
  in ``taken``, in their order."""
  taken, found = set(taken), []
  for arch in candidates:
    key = space.canonical_key(arch)
    if key not in taken:
      taken.add(key)
      found.append(arch)
  return found


def _unseen_neighbours(space, archs: np.ndarray, taken: set) -> list[np.ndarray]:
  """The distinct one-edit neighbours of ``archs`` whose canonical keys are not in ``taken``."""
  return _unseen(space, (n for arch in archs for n in space.neighbours(arch)), taken)


def _far_from(candidates: list[np.ndarray], anchors: np.ndarray, min_edits: int):
  """The ``candidates`` that differ from every row of ``anchors`` in >= ``min_edits`` fields."""
  if not min_edits or not candidates:
    return candidates
  edits = (np.stack(candidates)[:, None, :] != anchors[None, :, :]).sum(-1)  # [C, A]
  return [c for c, far in zip(candidates, edits.min(1) >= min_edits) if far]


def _distinct_random(run: SearchRun, rng: np.random.Generator, n: int) -> np.ndarray:
  taken, archs = set(), []
  for _ in range(n):
    arch = sample_unseen(run, rng, exclude=taken)
    taken.add(run.space.canonical_key(arch))
    archs.append(arch)
  return np.stack(archs)


def _update_pool(cfg: NaoSearchConfig, pool, new):
  """The next pool; ``pool`` is sorted best first."""
  if not new:
    return pool
  new = np.stack(new)
  if cfg.pool_policy == 'keep_all':
    return np.concatenate([pool, new])
  keep = max(cfg.target_pool_size - len(new), 0)
  return np.concatenate([pool[:keep], new])


def _meta(round_index: int, pool: np.ndarray, rng: np.random.Generator, queries: int) -> dict:
  return {'round': round_index, 'pool': pool.tolist(), 'rng_state': rng.bit_generator.state,
          'queries': queries}
