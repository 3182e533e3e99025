"""Baselines in the same harness as NAO: random search and regularized evolution.

Both spend the budget one unseen architecture at a time through ``SearchRun.query`` and are
deterministic for a seed, so a killed run replays from its history and continues exactly.
"""

from __future__ import annotations

import collections

import numpy as np

from nao_jax.search.run import SearchRun


def sample_unseen(run: SearchRun, rng: np.random.Generator, exclude: set | None = None,
                  max_tries: int = 100_000) -> np.ndarray:
  """A uniformly random architecture not yet evaluated (nor in ``exclude``)."""
  exclude = exclude or set()
  for _ in range(max_tries):
    arch = run.space.sample(rng, 1)[0]
    key = run.space.canonical_key(arch)
    if not run.is_known(arch) and key not in exclude:
      return arch
  raise RuntimeError(f'no unseen architecture found in {max_tries} samples; the space is '
                     f'exhausted by this run')


def random_search(run: SearchRun, seed: int) -> int:
  """Evaluates uniformly random unseen architectures until the budget is spent; returns rounds."""
  rng = np.random.default_rng(seed)
  while run.remaining > 0:
    run.query([sample_unseen(run, rng)], round_index=0, source='random')
  return 0


def regularized_evolution(run: SearchRun, seed: int, population_size: int = 20,
                          sample_size: int = 5, max_mutation_tries: int = 100) -> int:
  """Aging evolution (Real et al. 2019) with tournament selection.

  The first ``population_size`` queries are random. Then, each cycle: draw ``sample_size``
  members uniformly without replacement, mutate the best one until the child is unseen (a
  previously evaluated child would cost no query but add no information; after
  ``max_mutation_tries`` a random unseen architecture is used instead), evaluate it, append it
  and drop the oldest member. Returns the number of cycles.
  """
  if population_size < 1 or not 1 <= sample_size <= population_size:
    raise ValueError(f'need population_size >= 1 and 1 <= sample_size <= population_size, got '
                     f'{population_size} and {sample_size}')
  rng = np.random.default_rng(seed)
  population = collections.deque()
  sign = 1.0 if run.evaluator.higher_is_better else -1.0
  while run.remaining > 0 and len(population) < population_size:
    arch = sample_unseen(run, rng)
    population.append((arch, float(run.query([arch], 0, 'random')[0])))
  cycles = 0
  while run.remaining > 0:
    members = rng.choice(len(population), size=sample_size, replace=False)
    parent = max((population[i] for i in members), key=lambda m: sign * m[1])[0]
    for _ in range(max_mutation_tries):
      child = run.space.mutate(parent, rng)
      if not run.is_known(child):
        source = 'mutation'
        break
    else:
      child, source = sample_unseen(run, rng), 'random'
    cycles += 1
    population.append((child, float(run.query([child], cycles, source)[0])))
    population.popleft()
  return cycles
