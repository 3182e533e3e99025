"""Weight-sharing CNN supernet over the 5-op space (PT-V1 ``model_search.py``, spec §5.2, §5.5).

The architecture is data: ``arch`` is an ``int32[2, 5, 4]`` array (cell 0 normal, cell 1
reduction; node rows ``[x_id, x_op, y_id, y_op]``) traced through ``jit``, so one compiled program
serves every architecture of the space. The ops are those of the fixed network's op library
(``nao_jax.cnn.ops.op_table``; on CPU the sep convs' depthwise convolution is swapped for the
equal ``cpu_ops`` version, see ``primitives``); what this module adds is the weight sharing:

* **Weights per (node, branch x/y, input index, op)** (spec §12 item 6). Each parameterised op
  (the two sep convs) of a cell holds ``[2, SLOTS, ...]`` copies: branch x/y, then one slot per
  (node k, input i) pair, slot ``k (k + 3) / 2 + i`` (20 slots: node k may read k + 2 states);
  the copy of the chosen input is gathered with a dynamic index. BatchNorm inside them is PT's
  WSBN: the copies carry the affine ``scale``/``bias``, the running ``mean``/``var`` are one set
  per (node, branch, op): ``[5, 2, C]``.
* **Identity at stride 2** (reduction cell, input 0 or 1) is a FactorizedReduce chosen by the
  input index, ``fr: [F, 5, 2, ...]`` (owner, node, input), each with its own statistics. PT's y
  branch uses the x branch's modules (spec §9.1 #17): ``F = 1``, owner 0 for both branches;
  ``SupernetConfig.y_branch_own_fr`` gives the y branch its own (``F = 2``).
* **Node inputs** come from a stacked state buffer read with a dynamic index: ``float32[7, B, H,
  W, C]`` in a normal cell; a reduction cell keeps its two (full-resolution) inputs and its five
  (half-resolution) nodes apart, and a branch reading input 0/1 runs its op at stride 2.
* **The ten branches of a cell run under one ``lax.scan``** (node-major, x then y), so a cell's
  program holds one branch, whatever the architecture. (Unrolling the nodes in Python measured
  faster per cell on CPU, because XLA:CPU copies the loop-carried state buffer in every
  iteration, but made the reference network compile in ~8 minutes instead of ~2.)
* **Op dispatch** is a config value: ``'switch'`` runs only the chosen op (``lax.switch`` on the
  op id, and in reduction cells on whether the input is a cell input), ``'select'`` computes every
  candidate and keeps one (TF-WS style). Both give the same values and gradients (tested);
  ``'switch'`` is the default, see ``DISPATCH_NOTES``.
* **Cell output**: the loose ends (states no node reads; in reduction cells inputs 0/1 first go
  through a FactorizedReduce that is always computed and then masked) -> ReLU -> 1x1 conv whose
  weight is assembled from per-state blocks ``W[i]`` -> BN, computed as
  ``BN(sum_i loose_i * relu(x_i) @ W[i])``. Blocks of used states get exactly zero gradient.
* **Drop-path** on every branch output in training (keep 0.9 at the end, ScheduledDropPath §6.3).

Macro structure: stem Conv3x3(3C) -> BN; ``3N + 2`` cells, reductions at ``[N, 2N + 1]`` doubling
the channels; each cell first calibrates its inputs (``ops.calibrate_*``, PT MaybeCalibrateSize);
head GAP -> dropout (keep 1.0 in search) -> Linear. Every cell outputs its own ``C`` channels, so
the normal cells of a stage after the first (and, in stage 1, after the second) all have one
shape: they keep their parameters stacked on a leading axis and run under ``lax.scan``, so the
traced program, and hence compile time, does not grow with N.

Layout (``params``; ``batch_stats`` mirrors it with ``{'mean', 'var'}`` where BN has
``{'scale', 'bias'}``)::

    params = {'stem': {'conv', 'bn'},
              'cells': {'cell_00': cell, 'cell_01': cell, 'cells_02_02': stacked cells, ...},
              'classifier': {'kernel', 'bias'}}
    cell   = {'calibrate': {'x0'?, 'x1'?},
              'nodes': {'sep_conv_3x3': {dw1, pw1, bn1, dw2, pw2, bn2: [2, SLOTS, ...]},
                        'sep_conv_5x5': {...},
                        'fr'?: {conv1, conv2, bn: [F, 5, 2, ...]}},      # reduction cells
              'combine': {'w': float32[7, C, C], 'bn', 'fr0'?, 'fr1'?}}   # fr*: reduction cells
    stats of a cell: 'nodes': {'sep_conv_3x3': {'bn1', 'bn2': {'mean', 'var': [5, 2, C]}}, ...,
                               'fr'?: {'bn': [F, 5, 2, C]}}

Deviations from PT-V1, all named options of ``SupernetConfig`` (defaults are PT):
``y_branch_own_fr`` (fix the §9.1 #17 sharing quirk), ``drop_path_identity`` (TF never drops
identity); ``dispatch``, ``remat_branches`` and ``primitives`` change speed, not the function.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nao_jax.cnn import cpu_ops, ops
from nao_jax.cnn.network import drop_path_keep_prob
from nao_jax.spaces import WS_SPACE
from nao_jax.spaces.base import SearchSpace

Params = dict[str, Any]
Stats = dict[str, Any]
NODES = 5
STATES = NODES + 2
# Per-input parameter copies of one branch, node-major: node k, input i is slot k(k+3)/2 + i.
SLOTS = sum(k + 2 for k in range(NODES))
DISPATCHES = ('switch', 'select')
PRIMITIVES = ('auto', 'library', 'shifts')

# Why 'switch' is the default (measured with benchmarks/supernet.py, see its docstring):
DISPATCH_NOTES = """\
XLA:CPU executes a lax.switch as a real conditional, so only the chosen op runs; 'select' runs all
five candidates (ten in reduction cells: stride 2 on the inputs and stride 1 on the nodes), which
costs several times the FLOPs of the chosen op. Measured on the 2-core CPU (N=1, C=20, batch 64,
32x32, a new architecture every step, load average ~9): switch 4.8 s per training step (2.3
CPU-s), select 20.5 s (10.3 CPU-s); same compile time (76 s vs 81 s). On GPU a conditional is also a real branch (the
predicate is read back, or a CUDA-graph conditional node is used), and on TPU it runs on the scalar
core, so 'switch' stays the better default there as long as the branch is not vmapped: under vmap
(e.g. vmapping over architectures) JAX turns a switch into a select of all branches anyway, which
is why scoring maps over architectures sequentially instead of vmapping."""


@dataclasses.dataclass(frozen=True)
class SupernetConfig:
  """Macro-architecture and options of the weight-sharing supernet (PT-V1 search defaults).

  Attributes:
    layers: N, normal cells per stage (3N + 2 cells in all).
    channels: C of the first stage (doubled at each reduction cell).
    num_classes: classifier outputs.
    stem_multiplier: the stem has ``stem_multiplier * C`` channels.
    drop_path_keep: final keep probability of scheduled drop-path on every branch; 1 disables.
    dropout_keep: keep probability of the dropout before the classifier (PT search: 1.0; TF-WS
      0.9).
    dispatch: ``'switch'`` (only the chosen op runs) or ``'select'`` (all candidates run, one is
      kept, as in TF-WS); the same function.
    y_branch_own_fr: give the y branch its own stride-2 identity FactorizedReduce. PT-V1 creates
      one but never uses it: its y branch applies the x branch's (spec §9.1 #17); False = PT.
    drop_path_identity: drop identity branches too (PT-V1); TF never drops them.
    remat_branches: recompute each candidate op in the backward pass (``jax.checkpoint`` on
      every switch branch). Without it, JAX makes every branch of a switch output the union of
      all branches' residuals (zeros for the others) and the scan over branches stacks them:
      measured ~2.5x slower training steps on CPU (16 s vs 6 s at the reference config).
    primitives: ``'library'`` (the op library as is), ``'shifts'`` (sep convs with
      ``cpu_ops.depthwise_conv``: XLA:CPU runs grouped convolutions ~20x slower than the same
      k*k shifted multiply-adds) or ``'auto'`` (``'shifts'`` on CPU, ``'library'`` elsewhere).
  """
  layers: int = 3
  channels: int = 20
  num_classes: int = 10
  stem_multiplier: int = 3
  drop_path_keep: float = 0.9
  dropout_keep: float = 1.0
  dispatch: str = 'switch'
  y_branch_own_fr: bool = False
  drop_path_identity: bool = True
  remat_branches: bool = True
  primitives: str = 'auto'


@dataclasses.dataclass(frozen=True)
class SuperCellPlan:
  """Static description of one supernet cell (the architecture is not part of it).

  Attributes:
    index: position among the 3N + 2 cells.
    reduction: whether this is a reduction cell (runs the reduction spec ``arch[1]``).
    channels: C of this cell; its output has C channels too.
    in_shapes: ``((level, channels), (level, channels))`` of the raw inputs h_{i-2}, h_{i-1};
      ``level`` counts the reductions before (spatial size = image size / 2**level).
    out_shape: ``(level, channels)``.
  """
  index: int
  reduction: bool
  channels: int
  in_shapes: tuple[tuple[int, int], tuple[int, int]]
  out_shape: tuple[int, int]

  @property
  def steady(self) -> bool:
    """Inputs and output all of one shape: such cells share one scanned body."""
    return self.in_shapes[0] == self.in_shapes[1] == self.out_shape


def _take(tree, *indices):
  """``leaf[i0, i1, ...]`` (traced indices over the leading axes) of every leaf."""
  def take(a):
    for i in indices:
      a = lax.dynamic_index_in_dim(a, i, 0, keepdims=False)
    return a
  return jax.tree.map(take, tree)


def _put(tree, new, *indices):
  """``tree`` with ``leaf[i0, i1, ...]`` (traced indices) replaced by ``new``'s leaf."""
  def put(a, n):
    zero = jnp.zeros((), jnp.int32)
    starts = tuple(jnp.asarray(i, jnp.int32) for i in indices) + (zero,) * n.ndim
    return lax.dynamic_update_slice(a, n.reshape((1,) * len(indices) + n.shape), starts)
  return jax.tree.map(put, tree, new)


def _select(index, trees):
  """``trees[index]`` for a traced ``index``, elementwise over identically shaped trees."""
  return jax.tree.map(lambda *xs: lax.select_n(index, *xs), *trees)


def _map_init(init: Callable, keys: jax.Array):
  """``init`` over an array of keys ``[*S]``, results stacked to ``[*S, ...]``.

  ``lax.map`` rather than ``vmap``: the op library draws initial weights with host callbacks,
  which do not batch; a map calls them once per key, exactly as separate ``init`` calls would.
  """
  flat = keys.reshape(-1)
  out = lax.map(init, flat)
  return jax.tree.map(lambda a: a.reshape(keys.shape + a.shape[1:]), out)


def _drop_arg(fn, position: int, *args):
  """``fn`` called without its argument at ``position`` (candidates read one of two states)."""
  return fn(*args[:position], *args[position + 1:])


def loose_mask(cell_arch: jax.Array) -> jax.Array:
  """``bool[7]``: which states of a cell (``int32[5, 4]``) no node reads (its loose ends)."""
  ids = jnp.concatenate([cell_arch[:, 0], cell_arch[:, 2]])
  return ~jnp.any(ids[None, :] == jnp.arange(STATES)[:, None], axis=1)


class Supernet:
  """The PT-V1 weight-sharing CIFAR supernet over the 5-op space, architecture as data.

  Args:
    config: macro-architecture and options.
    space: the 5-op space (its op names pick the op library).
  """

  def __init__(self, config: SupernetConfig = SupernetConfig(),
               space: SearchSpace = WS_SPACE):
    if config.dispatch not in DISPATCHES:
      raise ValueError(f'dispatch must be one of {DISPATCHES}, got {config.dispatch!r}')
    if config.layers < 1:
      raise ValueError(f'layers must be >= 1, got {config.layers}')
    self.config = config
    self.space = space
    if config.primitives not in PRIMITIVES:
      raise ValueError(f'primitives must be one of {PRIMITIVES}, got {config.primitives!r}')
    self.primitives = config.primitives
    if self.primitives == 'auto':
      self.primitives = 'shifts' if jax.default_backend() == 'cpu' else 'library'
    self.ops = ops.op_table(space.ops)
    if self.primitives == 'shifts':
      self.ops = cpu_ops.fast_op_table(self.ops)
    self.op_names = tuple(op.name for op in self.ops)
    self.identity_id = next(i for i, op in enumerate(self.ops) if op.is_identity)
    self.num_cells = 3 * config.layers + 2
    self.reduction_indices = (config.layers, 2 * config.layers + 1)
    self.cells = self._plan()
    self.segments = self._segments()
    # Ops with parameters at stride 1 get per-input copies; identity's stride-2 FR is separate.
    self.param_ops = tuple(
        name for op, name in zip(self.ops, self.op_names)
        if not op.is_identity and jax.tree.leaves(jax.eval_shape(
            functools.partial(op.init, c_in=4, c_out=4, stride=1), jax.random.key(0))[0]))

  # -- static structure ---------------------------------------------------------------------------

  def _plan(self) -> tuple[SuperCellPlan, ...]:
    cfg = self.config
    stem = (0, cfg.stem_multiplier * cfg.channels)
    prev = [stem, stem]
    c = cfg.channels
    plans = []
    for index in range(self.num_cells):
      reduction = index in self.reduction_indices
      if reduction:
        c *= 2
      out = (prev[1][0] + int(reduction), c)
      plans.append(SuperCellPlan(index, reduction, c, (prev[0], prev[1]), out))
      prev = [prev[1], out]
    return tuple(plans)

  def _segments(self) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` runs of cells; runs of steady cells (any length) are scanned."""
    segments, i = [], 0
    while i < self.num_cells:
      stop = i + 1
      if self.cells[i].steady:
        while (stop < self.num_cells and self.cells[stop].steady
               and self.cells[stop].in_shapes == self.cells[i].in_shapes):
          stop += 1
      segments.append((i, stop))
      i = stop
    return tuple(segments)

  def is_scanned(self, start: int, stop: int) -> bool:
    """Whether segment ``[start, stop)`` runs under ``lax.scan`` (stacked parameters)."""
    del stop
    return self.cells[start].steady

  @staticmethod
  def segment_key(start: int, stop: int, scanned: bool) -> str:
    return f'cells_{start:02d}_{stop - 1:02d}' if scanned else f'cell_{start:02d}'

  def cell_variables(self, params: Params, batch_stats: Stats,
                     index: int) -> tuple[Params, Stats]:
    """The (unstacked) parameters and statistics of cell ``index``."""
    for start, stop in self.segments:
      if start <= index < stop:
        scanned = self.is_scanned(start, stop)
        name = self.segment_key(start, stop, scanned)
        p, s = params['cells'][name], batch_stats['cells'][name]
        if scanned:
          p, s = jax.tree.map(lambda a: a[index - start], (p, s))
        return p, s
    raise IndexError(f'cell {index} out of range 0..{self.num_cells - 1}')

  # -- init ---------------------------------------------------------------------------------------

  def _init_branches(self, key: jax.Array, c: int) -> tuple[Params, Stats]:
    """Per-input parameters of the parameterised ops of every branch.

    Returns params with leaves ``[2, SLOTS, ...]`` (branch x/y, then (node, input) slot) and
    statistics with leaves ``[NODES, 2, ...]`` (WSBN: one set per node and branch, shared by
    the input indices).
    """
    params, stats = {}, {}
    for name, k in zip(self.param_ops, jax.random.split(key, len(self.param_ops))):
      op = self.ops[self.op_names.index(name)]
      keys = jax.random.split(k, 2 * SLOTS).reshape(2, SLOTS)
      p, s = _map_init(lambda kk, op=op: op.init(kk, c, c, 1), keys)
      params[name] = p
      stats[name] = jax.tree.map(lambda a: jnp.broadcast_to(a[0, :1], (NODES, 2) + a.shape[2:]),
                                 s)
    return params, stats

  def _init_fr(self, key: jax.Array, c: int) -> tuple[Params, Stats]:
    """Stride-2 identity FactorizedReduce per (owner, node, input index 0/1): ``[F, NODES, 2,
    ...]``, with ``F = 1`` (PT: the y branch uses the x branch's) or 2 (``y_branch_own_fr``)."""
    owners = 2 if self.config.y_branch_own_fr else 1
    keys = jax.random.split(key, owners * NODES * 2).reshape(owners, NODES, 2)
    init = lambda kk: ops.factorized_reduce_init(kk, c, c)
    return _map_init(init, keys)

  def init_cell(self, key: jax.Array, plan: SuperCellPlan) -> tuple[Params, Stats]:
    """Parameters and statistics of one cell (unstacked)."""
    k_cal, k_nodes, k_comb = jax.random.split(key, 3)
    c = plan.channels
    (level0, c0), (level1, c1) = plan.in_shapes
    p_cal, s_cal = ops.calibrate_init(k_cal, c0, c1, c, reduce_x0=level0 != level1)
    k_br, k_fr = jax.random.split(k_nodes)
    p_nodes, s_nodes = self._init_branches(k_br, c)
    if plan.reduction:
      p_nodes['fr'], s_nodes['fr'] = self._init_fr(k_fr, c)
    k_w, k_fr0, k_fr1 = jax.random.split(k_comb, 3)
    bn_p, bn_s = ops.batch_norm_init(c)
    # PT WSReLUConvBN: one kaiming-normal [C, C] block per state (fan_in C each).
    p_comb = {'w': ops.kaiming_normal(k_w, (STATES, c, c), c), 'bn': bn_p}
    s_comb = {'bn': bn_s}
    if plan.reduction:
      p_comb['fr0'], s_comb['fr0'] = ops.factorized_reduce_init(k_fr0, c, c)
      p_comb['fr1'], s_comb['fr1'] = ops.factorized_reduce_init(k_fr1, c, c)
    return ({'calibrate': p_cal, 'nodes': p_nodes, 'combine': p_comb},
            {'calibrate': s_cal, 'nodes': s_nodes, 'combine': s_comb})

  def init(self, key: jax.Array) -> tuple[Params, Stats]:
    """Returns ``(params, batch_stats)``; cheap to shape-evaluate with ``jax.eval_shape``.

    Jitted: the thousands of small initialisers would otherwise each dispatch eagerly.
    """
    return _jitted_init(self.config, self.space)(key)

  def _init(self, key: jax.Array) -> tuple[Params, Stats]:
    cfg = self.config
    k_stem, k_cells, k_cls = jax.random.split(key, 3)
    stem_p, stem_s = ops.conv_bn_init(k_stem, 3, cfg.stem_multiplier * cfg.channels, 3, 3)
    params, stats = {'stem': stem_p, 'cells': {}}, {'stem': stem_s, 'cells': {}}
    for start, stop in self.segments:
      scanned = self.is_scanned(start, stop)
      inits = [self.init_cell(jax.random.fold_in(k_cells, i), self.cells[i])
               for i in range(start, stop)]
      p, s = jax.tree.map(lambda *xs: jnp.stack(xs), *inits) if scanned else inits[0]
      name = self.segment_key(start, stop, scanned)
      params['cells'][name], stats['cells'][name] = p, s
    params['classifier'] = ops.linear_init(k_cls, self.cells[-1].channels, cfg.num_classes)
    return params, stats

  # -- one branch ---------------------------------------------------------------------------------

  def _op_fns(self, stride: int, train: bool) -> list[Callable[..., tuple]]:
    """One function per op id: ``(x, p_nodes, bs, fr_s, xy, slot, fr_index) -> (y, bs, fr_s)``.

    Args (of each function):
      x: the input state ``float32[B, H, W, C]``.
      p_nodes: the cell's node parameters; copy ``[xy, slot]`` of each per-input op is used.
      bs: statistics of this (node, branch) (shared by all input indices, WSBN).
      fr_s: the cell's stride-2 identity FR statistics (``[F, NODES, 2, ...]``) or None.
      xy, slot: branch (0 x, 1 y) and (node, input) slot of the per-input weights.
      fr_index: ``(owner, node, input)`` of the FactorizedReduce used at stride 2.
    """
    fns = []
    for op, name in zip(self.ops, self.op_names):
      def fn(x, p_nodes, bs, fr_s, xy, slot, fr_index, op=op, name=name):
        if op.is_identity:
          if stride == 1:
            return x, bs, fr_s
          y, new = ops.factorized_reduce_apply(_take(p_nodes['fr'], *fr_index),
                                               _take(fr_s, *fr_index), x, train=train)
          return y, bs, _put(fr_s, new, *fr_index)
        if name in self.param_ops:
          y, new = op.apply(_take(p_nodes[name], xy, slot), bs[name], x, stride=stride,
                            train=train)
          return y, {**bs, name: new}, fr_s
        y, _ = op.apply({}, {}, x, stride=stride, train=train)
        return y, bs, fr_s
      fns.append(jax.checkpoint(fn) if self.config.remat_branches else fn)
    return fns

  def _branch(self, reduction: bool, p_nodes: Params, bs: Stats, fr_s, node: jax.Array,
              xy: jax.Array, idx: jax.Array, op: jax.Array, x: jax.Array,
              x_node: jax.Array | None, train: bool):
    """Branch ``xy`` (0 x, 1 y) of node ``node``: op ``op`` on state ``idx``.

    Args:
      x: state ``idx`` in a normal cell; in a reduction cell input ``min(idx, 1)``.
      x_node: reduction cells: node ``idx - 2`` (any node when ``idx < 2``), or None when the
        node cannot read a node (node 0).

    In a reduction cell the candidates are the ops at stride 2 on the input followed by the ops
    at stride 1 on the node; the branch picks ``op + 5 * (idx >= 2)``.

    Returns:
      ``(y float32[B, h, w, C], new branch statistics, new FR statistics)``.
    """
    slot = node * (node + 3) // 2 + idx
    if not reduction:
      fns, index = self._op_fns(1, train), op
      operands = (x, p_nodes, bs, fr_s, xy, slot, ())
    else:
      in_idx = jnp.minimum(idx, 1)
      fr_index = (xy if self.config.y_branch_own_fr else jnp.zeros_like(xy), node, in_idx)
      fns, index = self._op_fns(2, train), op
      operands = (x, p_nodes, bs, fr_s, xy, slot, fr_index)
      if x_node is not None:
        # Candidates 0..4: stride 2 on the input; 5..9: stride 1 on the node.
        fns = ([functools.partial(_drop_arg, fn, 1) for fn in fns]
               + [functools.partial(_drop_arg, fn, 0) for fn in self._op_fns(1, train)])
        index = op + len(self.ops) * (idx >= 2).astype(op.dtype)
        operands = (x, x_node) + operands[1:]
    if self.config.dispatch == 'switch':
      return lax.switch(index, fns, *operands)
    return _select(index, [fn(*operands) for fn in fns])

  # -- one cell -----------------------------------------------------------------------------------

  def cell_apply(self, plan: SuperCellPlan, params: Params, stats: Stats, s0: jax.Array,
                 s1: jax.Array, cell_arch: jax.Array, *, train: bool,
                 rng: jax.Array | None = None, keep=None) -> tuple[jax.Array, Stats]:
    """One cell: ``(h_{i-2}, h_{i-1}) -> float32[B, H', W', C]``.

    The ten branches (node-major, x then y) run under one ``lax.scan``, so a cell's program
    holds a single branch whatever the number of nodes. The x branch of node k writes its output
    to the node's slot of the state buffer and the y branch adds to it; no branch of node k can
    read that slot, so the partial sum is never seen.

    Args:
      plan: the cell's static plan.
      params, stats: the cell's (unstacked) parameters and statistics.
      s0, s1: ``float32[B, H0, W0, C0]``, ``float32[B, H1, W1, C1]``.
      cell_arch: ``int32[5, 4]``, the normal or reduction spec (traced).
      train: BN with batch statistics (returns updated running statistics).
      rng: the cell's drop-path key; branch ``b = 2 * node + (0 for x, 1 for y)`` uses
        ``fold_in(rng, b)``, as the fixed network does.
      keep: drop-path keep probability of this cell (float or traced), None for no drop-path.
    """
    cfg = self.config
    c = plan.channels
    cell_arch = jnp.asarray(cell_arch, jnp.int32)
    s0, s1, s_cal = ops.calibrate_apply(params['calibrate'], stats['calibrate'], s0, s1,
                                        train=train)
    b, h, w, _ = s1.shape
    if plan.reduction:
      if h % 2 or w % 2:
        raise ValueError(f'a reduction cell needs even spatial sizes, got {h}x{w}')
      inputs = jnp.stack([s0, s1])
      buffer = jnp.zeros((NODES, b, h // 2, w // 2, c), s1.dtype)
    else:
      inputs = None
      buffer = jnp.concatenate([s0[None], s1[None], jnp.zeros((NODES, b, h, w, c), s1.dtype)])
    p_nodes, s_nodes = params['nodes'], dict(stats['nodes'])
    fr_s = s_nodes.pop('fr', None)
    # Per-(node, branch) statistics, flattened node-major to the scan's 10 steps.
    branch_stats = jax.tree.map(lambda a: a.reshape((2 * NODES,) + a.shape[2:]), s_nodes)
    specs = cell_arch.reshape(2 * NODES, 2)  # [x_id, x_op], [y_id, y_op], ... node-major

    def one_branch(buffer, fr_s, b, spec, bs):
      node, xy = b // 2, b % 2
      idx, op = spec[0], spec[1]
      if plan.reduction:
        x = lax.dynamic_index_in_dim(inputs, jnp.minimum(idx, 1), 0, keepdims=False)
        x_node = lax.dynamic_index_in_dim(buffer, jnp.maximum(idx - 2, 0), 0, keepdims=False)
      else:
        x, x_node = lax.dynamic_index_in_dim(buffer, idx, 0, keepdims=False), None
      y, bs, fr_s = self._branch(plan.reduction, p_nodes, bs, fr_s, node, xy, idx, op, x, x_node,
                                 train)
      if keep is not None:
        y_dropped = ops.drop_path(y, keep, jax.random.fold_in(rng, b))
        y = (y_dropped if cfg.drop_path_identity
             else jnp.where(op == self.identity_id, y, y_dropped))
      return y, bs, fr_s

    def branch_body(carry, xs):
      buffer, fr_s = carry
      b, spec, bs = xs
      y, bs, fr_s = one_branch(buffer, fr_s, b, spec, bs)
      node, xy = b // 2, b % 2
      pos = node if plan.reduction else node + 2
      prev = lax.dynamic_index_in_dim(buffer, pos, 0, keepdims=False)
      y = jnp.where(xy == 0, y, prev + y)
      return (lax.dynamic_update_index_in_dim(buffer, y, pos, 0), fr_s), bs

    (buffer, fr_s), branch_stats = lax.scan(branch_body, (buffer, fr_s),
                                            (jnp.arange(2 * NODES), specs, branch_stats))
    new_nodes = jax.tree.map(lambda a: a.reshape((NODES, 2) + a.shape[1:]), branch_stats)
    if fr_s is not None:
      new_nodes['fr'] = fr_s
    states = buffer if not plan.reduction else None
    out, new_comb = self._combine(plan, params, stats, cell_arch, inputs, states,
                                  buffer if plan.reduction else None, train)
    return out, {'calibrate': s_cal, 'nodes': new_nodes, 'combine': new_comb}

  def _combine(self, plan: SuperCellPlan, params: Params, stats: Stats, cell_arch: jax.Array,
               inputs, states, nodes, train: bool) -> tuple[jax.Array, Stats]:
    """Loose ends -> (FactorizedReduce of inputs 0/1 in reduction cells) -> ReLU -> 1x1 -> BN.

    Args:
      inputs: reduction cells: ``float32[2, B, H, W, C]`` (the calibrated inputs).
      states: normal cells: all seven states ``float32[7, B, H, W, C]``.
      nodes: reduction cells: the five nodes ``float32[5, B, H/2, W/2, C]``.
    """
    loose = loose_mask(cell_arch)
    p_comb, s_comb = params['combine'], stats['combine']
    new_comb = {}
    if plan.reduction:
      reduced = []
      for i in (0, 1):
        # Computed unconditionally; its statistics move only when input i is a loose end (PT).
        # (Skipping it with lax.cond when input i is used, as it nearly always is, measured
        # no faster on CPU.)
        y, new = ops.factorized_reduce_apply(p_comb[f'fr{i}'], s_comb[f'fr{i}'], inputs[i],
                                             train=train)
        new_comb[f'fr{i}'] = jax.tree.map(lambda n, o, i=i: jnp.where(loose[i], n, o), new,
                                          s_comb[f'fr{i}'])
        reduced.append(y)
      states = jnp.concatenate([jnp.stack(reduced), nodes])
    # Masking W rather than the states: a loose end contributes relu(x_i) @ W[i], used states
    # nothing (and their blocks get zero gradient), i.e. PT's concat -> ReLU -> 1x1 conv.
    w_masked = p_comb['w'] * loose[:, None, None].astype(p_comb['w'].dtype)
    out = jnp.einsum('nbhwc,ncd->bhwd', jax.nn.relu(states), w_masked)
    out, new_comb['bn'] = ops.batch_norm(p_comb['bn'], s_comb['bn'], out, train=train)
    return out, new_comb

  # -- network ------------------------------------------------------------------------------------

  def _keep(self, stochastic: bool, progress, cell_index):
    if not stochastic or self.config.drop_path_keep >= 1.0:
      return None
    return drop_path_keep_prob(self.config.drop_path_keep, progress, cell_index, self.num_cells)

  def apply(self, params: Params, batch_stats: Stats, images: jax.Array, arch: jax.Array, *,
            train: bool, rng: jax.Array | None = None,
            drop_path_progress=0.0) -> tuple[jax.Array, Stats]:
    """Forward pass of architecture ``arch`` through the shared weights.

    Args:
      params, batch_stats: from ``init``.
      images: ``float32[B, H, W, 3]`` (H, W divisible by 4).
      arch: ``int32[2, 5, 4]`` (traced; any architecture of the space, no recompilation).
      train: BatchNorm with batch statistics (the statistics returned are updated). Scoring
        uses ``train=True`` with ``rng=None`` (PT ``bn_train=True`` in eval mode).
      rng: key of drop-path and dropout; None disables both (evaluation / scoring).
      drop_path_progress: r_step in [0, 1] of the drop-path schedule (traced or float).

    Returns:
      ``(logits float32[B, K], new_batch_stats)``.
    """
    cfg = self.config
    arch = jnp.asarray(arch, jnp.int32)
    stochastic = train and rng is not None
    dp_rng, do_rng = jax.random.split(rng) if stochastic else (None, None)
    x = ops.conv2d(images, params['stem']['conv'], 1, ((1, 1), (1, 1)))
    x, stem_s = ops.batch_norm(params['stem']['bn'], batch_stats['stem']['bn'], x, train=train)
    new_stats = {'stem': {'bn': stem_s}, 'cells': {}}
    s0 = s1 = x
    for start, stop in self.segments:
      scanned = self.is_scanned(start, stop)
      name = self.segment_key(start, stop, scanned)
      p, s = params['cells'][name], batch_stats['cells'][name]
      plan = self.cells[start]
      cell_arch = arch[int(plan.reduction)]
      if scanned:
        def body(carry, xs, plan=plan, cell_arch=cell_arch):
          c0, c1 = carry
          cp, cs, index = xs
          cell_rng = None if dp_rng is None else jax.random.fold_in(dp_rng, index)
          out, ns = self.cell_apply(plan, cp, cs, c0, c1, cell_arch, train=train, rng=cell_rng,
                                    keep=self._keep(stochastic, drop_path_progress, index))
          return (c1, out), ns
        (s0, s1), new_stats['cells'][name] = lax.scan(body, (s0, s1),
                                                      (p, s, jnp.arange(start, stop)))
      else:
        cell_rng = None if dp_rng is None else jax.random.fold_in(dp_rng, start)
        out, new_stats['cells'][name] = self.cell_apply(
            plan, p, s, s0, s1, cell_arch, train=train, rng=cell_rng,
            keep=self._keep(stochastic, drop_path_progress, start))
        s0, s1 = s1, out
    feats = jnp.mean(s1, axis=(1, 2))
    if stochastic and cfg.dropout_keep < 1.0:
      mask = jax.random.bernoulli(do_rng, cfg.dropout_keep, feats.shape)
      feats = jnp.where(mask, feats / cfg.dropout_keep, 0.0)
    return ops.linear_apply(params['classifier'], feats), new_stats


@functools.lru_cache(maxsize=16)
def _jitted_init(config: SupernetConfig, space: SearchSpace) -> Callable:
  """One jitted ``init`` per configuration (a fresh ``jax.jit`` per call would recompile)."""
  return jax.jit(Supernet(config, space)._init)


def count_params(tree) -> int:
  """Total number of elements of a pytree of arrays or ``ShapeDtypeStruct``s."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


__all__ = ['SupernetConfig', 'Supernet', 'SuperCellPlan', 'loose_mask', 'count_params',
           'DISPATCHES', 'DISPATCH_NOTES']
