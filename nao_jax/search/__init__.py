"""The NAO search loop, its evaluators, the baselines, and ``run_search`` that ties them up."""

from nao_jax.search.api import SEARCHERS, build_evaluator, run_search
from nao_jax.search.evaluators import Evaluator, TabularEvaluator
from nao_jax.search.nao import NaoSearchConfig, nao_search
from nao_jax.search.run import BudgetExhausted, SearchRun
