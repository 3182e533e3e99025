"""Fixed-architecture CIFAR network (PT-V1 ``NASNetworkCIFAR``, spec §6.1-§6.4).

The architecture (``int32[2, 5, 4]`` of a CNN space) is read at Python time into a static plan
of cells; parameters and BatchNorm statistics are two pytrees (see ``nao_jax.cnn.ops``)::

    params = {'stem': {'conv', 'bn'},
              'cells': {'cell_00': cell, 'cell_01': cell, 'cells_02_05': stacked cells, ...},
              'aux_head': {...},            # only with config.use_aux_head
              'classifier': {'kernel', 'bias'}}
    cell   = {'calibrate': {'x0'?, 'x1'?}, 'branches': {'node2_x', 'node2_y', ..., 'node6_y'},
              'combine': {'fr0'?, 'fr1'?}}

``batch_stats`` has the same layout, holding ``{'mean', 'var'}`` where ``params`` holds a BN's
``{'scale', 'bias'}``. Runs of consecutive normal cells whose inputs and output all have the same
shape (the normal cells of a stage after its first one or two) keep their parameters stacked on a
leading axis under one ``'cells_AA_BB'`` key and run under ``lax.scan``, so the traced program,
and hence compile time, does not grow with N.

Deviations from PT-V1 available as ``NetworkConfig`` switches (defaults are PT):
``drop_path_identity`` (TF never drops identity branches), ``relu_before_gap`` (TF),
``avg_pool_exclude_pad`` (TF avg pools), ``aux_head_tf_position`` (TF: after the first normal cell
of stage 3 instead of on the second reduction cell).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from nao_jax.cnn import cpu_ops
from nao_jax.cnn import ops
from nao_jax.spaces import loose_ends
from nao_jax.spaces.base import SearchSpace

Params = dict[str, Any]
Stats = dict[str, Any]
NODES = 5
AUX_WEIGHT = 0.4


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
  """Macro-architecture and regularisation of a stand-alone CIFAR network.

  Attributes:
    layers: N, normal cells per stage (3N + 2 cells in all).
    channels: F, channels of the first stage (doubled at each reduction cell).
    num_classes: classifier outputs.
    stem_multiplier: the stem has ``stem_multiplier * F`` channels.
    use_aux_head: build the auxiliary classifier (used in training only).
    drop_path_keep: keep probability of scheduled drop-path at the end of training; 1 disables.
    dropout_keep: keep probability of the dropout before the classifier; 1 disables.
    drop_path_identity: also drop identity branches (PT-V1 since commit 41efeed); TF: False.
    relu_before_gap: ReLU before global average pooling (TF); PT has none.
    avg_pool_exclude_pad: every avg pool averages real pixels only (TF); PT counts padded zeros
      in the 11-op space's avg pools.
    aux_head_tf_position: auxiliary head after the first normal cell of stage 3 (TF) instead of
      on the output of the second reduction cell (PT ``aux_head_index = 2N + 1``).
    merge_convs: run ReLU-Conv-BN branches that read the same state with the same kernel and
      stride as one wider conv (same function, faster on CPU; see ``merge_groups``).
    primitives: ``'library'`` (the op library as is), ``'shifts'`` (separable convs with
      ``cpu_ops.depthwise_conv``, k*k shifted multiply-adds: XLA:CPU runs grouped convolutions
      far slower; same function) or ``'auto'`` (``'shifts'`` on CPU, ``'library'`` elsewhere).
  """
  layers: int = 6
  channels: int = 36
  num_classes: int = 10
  stem_multiplier: int = 3
  use_aux_head: bool = True
  drop_path_keep: float = 0.8
  dropout_keep: float = 0.6
  drop_path_identity: bool = True
  relu_before_gap: bool = False
  avg_pool_exclude_pad: bool = False
  aux_head_tf_position: bool = False
  merge_convs: bool = True
  primitives: str = 'auto'


@dataclasses.dataclass(frozen=True)
class Branch:
  """One branch of a node: ``op`` (space op id) applied to state ``input`` with ``stride``."""
  input: int
  op: int
  stride: int


@dataclasses.dataclass(frozen=True)
class CellPlan:
  """Static description of one cell.

  Attributes:
    index: position among the 3N + 2 cells.
    reduction: whether this is a reduction cell.
    channels: C of this cell (every node has C channels).
    in_shapes: ``((level, channels), (level, channels))`` of the raw inputs h_{i-2}, h_{i-1};
      ``level`` counts the reductions before it (spatial size = image size / 2**level).
    branches: ``2 * NODES`` branches, node-major (x then y).
    concat: loose ends, concatenated in this order.
    out_shape: ``(level, len(concat) * channels)``.
  """
  index: int
  reduction: bool
  channels: int
  in_shapes: tuple[tuple[int, int], tuple[int, int]]
  branches: tuple[Branch, ...]
  concat: tuple[int, ...]
  out_shape: tuple[int, int]

  @property
  def steady(self) -> bool:
    """Inputs and output all of one shape: such cells can share one scanned body."""
    return self.in_shapes[0] == self.in_shapes[1] == self.out_shape


def drop_path_keep_prob(keep: float, progress, cell_index, num_cells: int):
  """ScheduledDropPath keep probability (spec §6.3).

  ``keep_eff = 1 - progress * (cell_index + 1) / num_cells * (1 - keep)``.

  Args:
    keep: final keep probability (``NetworkConfig.drop_path_keep``).
    progress: r_step in [0, 1], see ``drop_path_progress``; float or traced scalar.
    cell_index: 0-based cell index (stem excluded); int or traced scalar.
    num_cells: 3N + 2.
  """
  return 1.0 - progress * ((cell_index + 1) / num_cells) * (1.0 - keep)


def drop_path_progress(step, total_steps: int):
  """r_step = min(1, step / total_steps). PT-V1 counts ``step + 1``: pass that for PT parity."""
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / total_steps)


class FixedNetwork:
  """A NASNet-style CIFAR network for one architecture of a CNN space.

  Args:
    space: the architecture's space (``WS_SPACE`` or ``NAO_SPACE``).
    arch: ``int[2, 5, 4]`` (normal cell, reduction cell).
    config: macro-architecture and options.
  """

  def __init__(self, space: SearchSpace, arch, config: NetworkConfig = NetworkConfig()):
    self.space = space
    self.arch = space.validate(arch)
    self.config = config
    self.ops = ops.op_table(space.ops, config.avg_pool_exclude_pad)
    primitives = config.primitives
    if primitives == 'auto':
      primitives = 'shifts' if jax.default_backend() == 'cpu' else 'library'
    if primitives not in ('library', 'shifts'):
      raise ValueError(f"primitives must be 'library', 'shifts' or 'auto', got {primitives!r}")
    if primitives == 'shifts':
      self.ops = cpu_ops.fast_op_table(self.ops)
    self.num_cells = 3 * config.layers + 2
    self.reduction_indices = (config.layers, 2 * config.layers + 1)
    self.aux_head_index = self.reduction_indices[1] + int(config.aux_head_tf_position)
    self.cells = self._plan()
    self.segments = self._segments()

  # -- static structure ---------------------------------------------------------------------------

  def _plan(self) -> tuple[CellPlan, ...]:
    cfg = self.config
    stem = (0, cfg.stem_multiplier * cfg.channels)
    prev = [stem, stem]
    c = cfg.channels
    plans = []
    for index in range(self.num_cells):
      reduction = index in self.reduction_indices
      if reduction:
        c *= 2
      cell = self.arch[int(reduction)]
      level = prev[1][0] + int(reduction)
      branches = []
      for node in range(NODES):
        for slot in (0, 2):
          input_id, op = int(cell[node, slot]), int(cell[node, slot + 1])
          stride = 2 if reduction and input_id < 2 else 1
          branches.append(Branch(input_id, op, stride))
      concat = tuple(loose_ends(cell))
      plans.append(CellPlan(index, reduction, c, (prev[0], prev[1]), tuple(branches), concat,
                            (level, len(concat) * c)))
      prev = [prev[1], plans[-1].out_shape]
    return tuple(plans)

  def _segments(self) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` runs of cells; runs of steady cells (any length) are scanned."""
    segments, i = [], 0
    while i < self.num_cells:
      stop = i + 1
      if self.cells[i].steady:
        while (stop < self.num_cells and stop - 1 != self.aux_head_index
               and self.cells[stop].steady
               and self.cells[stop].in_shapes == self.cells[i].in_shapes):
          stop += 1
      segments.append((i, stop))
      i = stop
    return tuple(segments)

  def is_scanned(self, start: int, stop: int) -> bool:
    """Whether segment ``[start, stop)`` runs under ``lax.scan`` (stacked parameters)."""
    del stop
    return self.cells[start].steady

  def cell_variables(self, params: Params, batch_stats: Stats,
                     index: int) -> tuple[Params, Stats]:
    """The (unstacked) parameters and statistics of cell ``index``."""
    for start, stop in self.segments:
      if start <= index < stop:
        scanned = self.is_scanned(start, stop)
        name = self.segment_key(start, stop, scanned)
        p, s = params['cells'][name], batch_stats['cells'][name]
        return (unstack(p, index - start), unstack(s, index - start)) if scanned else (p, s)
    raise IndexError(f'cell {index} out of range 0..{self.num_cells - 1}')

  @staticmethod
  def segment_key(start: int, stop: int, scanned: bool) -> str:
    return f'cells_{start:02d}_{stop - 1:02d}' if scanned else f'cell_{start:02d}'

  @property
  def output_channels(self) -> int:
    return self.cells[-1].out_shape[1]

  # -- init ---------------------------------------------------------------------------------------

  def init_cell(self, key: jax.Array, plan: CellPlan) -> tuple[Params, Stats]:
    """Parameters and statistics of one cell (unstacked)."""
    k_cal, k_br, k_comb = jax.random.split(key, 3)
    c = plan.channels
    (level0, c0), (level1, c1) = plan.in_shapes
    p_cal, s_cal = ops.calibrate_init(k_cal, c0, c1, c, reduce_x0=level0 != level1)
    p_br, s_br = {}, {}
    for b, (branch, k) in enumerate(zip(plan.branches, jax.random.split(k_br, 2 * NODES))):
      name = _branch_name(b)
      p_br[name], s_br[name] = self.ops[branch.op].init(k, c, c, branch.stride)
    p_comb, s_comb = {}, {}
    if plan.reduction:
      for i, k in zip((0, 1), jax.random.split(k_comb)):
        if i in plan.concat:
          p_comb[f'fr{i}'], s_comb[f'fr{i}'] = ops.factorized_reduce_init(k, c, c)
    return ({'calibrate': p_cal, 'branches': p_br, 'combine': p_comb},
            {'calibrate': s_cal, 'branches': s_br, 'combine': s_comb})

  def init(self, key: jax.Array) -> tuple[Params, Stats]:
    """Returns ``(params, batch_stats)``; cheap to shape-evaluate with ``jax.eval_shape``."""
    cfg = self.config
    k_stem, k_cells, k_aux, k_cls = jax.random.split(key, 4)
    c_stem = cfg.stem_multiplier * cfg.channels
    stem_p, stem_s = ops.conv_bn_init(k_stem, 3, c_stem, 3, 3)
    params, stats = {'stem': stem_p, 'cells': {}}, {'stem': stem_s, 'cells': {}}
    for start, stop in self.segments:
      scanned = self.is_scanned(start, stop)
      inits = [self.init_cell(jax.random.fold_in(k_cells, i), self.cells[i])
               for i in range(start, stop)]
      if scanned:
        p, s = jax.tree.map(lambda *xs: jnp.stack(xs), *inits)
      else:
        p, s = inits[0]
      name = self.segment_key(start, stop, scanned)
      params['cells'][name], stats['cells'][name] = p, s
    if cfg.use_aux_head:
      params['aux_head'], stats['aux_head'] = aux_head_init(
          k_aux, self.cells[self.aux_head_index].out_shape[1], cfg.num_classes)
    params['classifier'] = ops.linear_init(k_cls, self.output_channels, cfg.num_classes)
    return params, stats

  # -- apply --------------------------------------------------------------------------------------

  def cell_apply(self, plan: CellPlan, params: Params, stats: Stats, s0: jax.Array,
                 s1: jax.Array, *, train: bool, rng: jax.Array | None = None,
                 keep=None) -> tuple[jax.Array, Stats]:
    """One cell: ``(h_{i-2}, h_{i-1}) -> float32[B, H', W', len(concat) * C]``.

    Args:
      plan: the cell's static plan.
      params, stats: the cell's (unstacked) parameters and statistics.
      s0, s1: ``float32[B, H, W, C0]``, ``float32[B, H1, W1, C1]``.
      train: BN batch statistics (and drop-path if ``keep`` is given).
      rng: the cell's drop-path key; branch ``b`` uses ``fold_in(rng, b)``.
      keep: drop-path keep probability of this cell (float or traced), None for no drop-path.
    """
    s0, s1, s_cal = ops.calibrate_apply(params['calibrate'], stats['calibrate'], s0, s1,
                                        train=train)
    states = [s0, s1]
    s_br = {}
    groups = self.merge_groups(plan) if self.config.merge_convs else {}
    done = {}  # branch -> (y, stats) already computed by a merged conv
    for node in range(NODES):
      outs = []
      for b in (2 * node, 2 * node + 1):
        branch, name = plan.branches[b], _branch_name(b)
        op = self.ops[branch.op]
        if b in groups and b not in done:
          names = [_branch_name(g) for g in groups[b]]
          ys, new = ops.relu_conv_bn_apply_many(
              [params['branches'][n] for n in names], [stats['branches'][n] for n in names],
              states[branch.input], stride=branch.stride, train=train)
          done.update(zip(groups[b], zip(ys, new)))
        if b in done:
          y, s_br[name] = done.pop(b)
        else:
          y, s_br[name] = op.apply(params['branches'][name], stats['branches'][name],
                                   states[branch.input], stride=branch.stride, train=train)
        if keep is not None and (self.config.drop_path_identity or not op.is_identity):
          y = ops.drop_path(y, keep, jax.random.fold_in(rng, b))
        outs.append(y)
      states.append(outs[0] + outs[1])
    s_comb = {}
    for i in plan.concat:
      if f'fr{i}' in params['combine']:
        states[i], s_comb[f'fr{i}'] = ops.factorized_reduce_apply(
            params['combine'][f'fr{i}'], stats['combine'][f'fr{i}'], states[i], train=train)
    out = jnp.concatenate([states[i] for i in plan.concat], axis=-1)
    return out, {'calibrate': s_cal, 'branches': s_br, 'combine': s_comb}

  def merge_groups(self, plan: CellPlan) -> dict[int, tuple[int, ...]]:
    """Branches that run as one conv: same input, same ReLU-Conv(k x k)-BN kind and stride.

    Returns ``{branch: group}`` for every branch in a group of two or more.
    """
    by_key: dict[tuple, list[int]] = {}
    for b, branch in enumerate(plan.branches):
      k = self.ops[branch.op].conv_kernel
      if k is not None:
        by_key.setdefault((branch.input, k, branch.stride), []).append(b)
    return {b: tuple(group) for group in by_key.values() if len(group) > 1 for b in group}

  def _keep(self, train: bool, progress, cell_index):
    if not train or self.config.drop_path_keep >= 1.0:
      return None
    return drop_path_keep_prob(self.config.drop_path_keep, progress, cell_index, self.num_cells)

  def _scan_cells(self, start: int, stop: int, params: Params, stats: Stats, s0: jax.Array,
                  s1: jax.Array, *, train: bool, rng, progress):
    plan = self.cells[start]

    def body(carry, xs):
      s0, s1 = carry
      p, s, index = xs
      cell_rng = None if rng is None else jax.random.fold_in(rng, index)
      out, new_s = self.cell_apply(plan, p, s, s0, s1, train=train, rng=cell_rng,
                                   keep=self._keep(train, progress, index))
      return (s1, out), new_s

    xs = (params, stats, jnp.arange(start, stop))
    (s0, s1), new_stats = lax.scan(body, (s0, s1), xs)
    return s0, s1, new_stats

  def apply(self, params: Params, batch_stats: Stats, images: jax.Array, *, train: bool,
            rng: jax.Array | None = None,
            drop_path_progress=0.0) -> tuple[jax.Array, jax.Array | None, Stats]:
    """Forward pass.

    Args:
      params, batch_stats: from ``init``.
      images: ``float32[B, H, W, 3]``.
      train: training mode (BN batch statistics, drop-path, dropout, auxiliary head).
      rng: key for drop-path and dropout; required when ``train`` and either is active.
      drop_path_progress: r_step in [0, 1] (``drop_path_progress(step, total_steps)``).

    Returns:
      ``(logits float32[B, K], aux_logits float32[B, K] or None, new_batch_stats)``;
      ``aux_logits`` is None outside training or without the auxiliary head, and the statistics
      are returned unchanged outside training.
    """
    cfg = self.config
    stochastic = train and (cfg.drop_path_keep < 1.0 or cfg.dropout_keep < 1.0)
    if stochastic and rng is None:
      raise ValueError('apply(train=True) with drop-path or dropout needs an rng')
    dp_rng, do_rng = jax.random.split(rng) if stochastic else (None, None)
    x = ops.conv2d(images, params['stem']['conv'], 1, ((1, 1), (1, 1)))
    x, stem_s = ops.batch_norm(params['stem']['bn'], batch_stats['stem']['bn'], x, train=train)
    new_stats = {'stem': {'bn': stem_s}, 'cells': {}}
    s0 = s1 = x
    aux_logits = None
    for start, stop in self.segments:
      scanned = self.is_scanned(start, stop)
      name = self.segment_key(start, stop, scanned)
      p, s = params['cells'][name], batch_stats['cells'][name]
      if scanned:
        s0, s1, new_stats['cells'][name] = self._scan_cells(
            start, stop, p, s, s0, s1, train=train, rng=dp_rng, progress=drop_path_progress)
      else:
        cell_rng = None if dp_rng is None else jax.random.fold_in(dp_rng, start)
        out, new_stats['cells'][name] = self.cell_apply(
            self.cells[start], p, s, s0, s1, train=train, rng=cell_rng,
            keep=self._keep(train, drop_path_progress, start))
        s0, s1 = s1, out
      if cfg.use_aux_head and stop - 1 == self.aux_head_index:
        if train:
          aux_logits, new_stats['aux_head'] = aux_head_apply(
              params['aux_head'], batch_stats['aux_head'], s1, train=True)
        else:
          new_stats['aux_head'] = batch_stats['aux_head']
    logits = self.head(params, s1, train=train, rng=do_rng)
    return logits, aux_logits, new_stats

  def head(self, params: Params, x: jax.Array, *, train: bool,
           rng: jax.Array | None) -> jax.Array:
    """Global average pool -> dropout -> linear: ``float32[B, H, W, C] -> float32[B, K]``."""
    if self.config.relu_before_gap:
      x = jax.nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    keep = self.config.dropout_keep
    if train and keep < 1.0:
      mask = jax.random.bernoulli(rng, keep, x.shape)
      x = jnp.where(mask, x / keep, 0.0)
    return ops.linear_apply(params['classifier'], x)


def _branch_name(b: int) -> str:
  return f'node{b // 2 + 2}_{"xy"[b % 2]}'


# -- auxiliary head -------------------------------------------------------------------------------


def aux_head_init(key: jax.Array, c_in: int, num_classes: int) -> tuple[Params, Stats]:
  """PT ``AuxHeadCIFAR``: 1x1 conv to 128, BN, 2x2 conv to 768, BN, linear."""
  k1, k2, k3 = jax.random.split(key, 3)
  bn1_p, bn1_s = ops.batch_norm_init(128)
  bn2_p, bn2_s = ops.batch_norm_init(768)
  params = {'conv1': ops.conv_init(k1, 1, 1, c_in, 128), 'bn1': bn1_p,
            'conv2': ops.conv_init(k2, 2, 2, 128, 768), 'bn2': bn2_p,
            'classifier': ops.linear_init(k3, 768, num_classes)}
  return params, {'bn1': bn1_s, 'bn2': bn2_s}


def aux_head_apply(params: Params, stats: Stats, x: jax.Array, *,
                   train: bool) -> tuple[jax.Array, Stats]:
  """ReLU -> avg 5x5/3 -> 1x1 conv -> BN -> ReLU -> 2x2 conv -> BN -> ReLU -> linear.

  Args:
    x: ``float32[B, 8, 8, C]`` (the stage-3 resolution of a 32x32 image).

  Returns:
    ``(logits float32[B, K], stats)``.
  """
  if x.shape[1:3] != (8, 8):
    raise ValueError(f'the CIFAR auxiliary head expects 8x8 inputs (32x32 images), got '
                     f'{x.shape[1:3]}')
  y = ops.avg_pool(jax.nn.relu(x), 5, 3, 0, count_include_pad=False)
  y = ops.conv2d(y, params['conv1'])
  y, bn1 = ops.batch_norm(params['bn1'], stats['bn1'], y, train=train)
  y = ops.conv2d(jax.nn.relu(y), params['conv2'])
  y, bn2 = ops.batch_norm(params['bn2'], stats['bn2'], y, train=train)
  y = jax.nn.relu(y).reshape(y.shape[0], -1)
  return ops.linear_apply(params['classifier'], y), {'bn1': bn1, 'bn2': bn2}


# -- losses and counting --------------------------------------------------------------------------


def loss(logits: jax.Array, aux_logits: jax.Array | None, labels: jax.Array,
         aux_weight: float = AUX_WEIGHT) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy plus ``aux_weight`` times the auxiliary one (spec §6.4).

  Args:
    logits, aux_logits: ``float32[B, K]``; ``aux_logits`` may be None.
    labels: ``int32[B]``.

  Returns:
    ``(loss, {'ce', 'aux_ce'})`` (``aux_ce`` is 0 without auxiliary logits).
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  aux_ce = (jnp.zeros(()) if aux_logits is None else
            optax.softmax_cross_entropy_with_integer_labels(aux_logits, labels).mean())
  return ce + aux_weight * aux_ce, {'ce': ce, 'aux_ce': aux_ce}


def count_params(tree) -> int:
  """Total number of elements of a pytree of arrays or ``ShapeDtypeStruct``s."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def parameter_counts(network: FixedNetwork) -> dict[str, int]:
  """Trainable parameter counts without allocating: ``{'total', 'aux_head', 'without_aux'}``."""
  params, _ = jax.eval_shape(network.init, jax.random.key(0))
  aux = count_params(params.get('aux_head', {}))
  total = count_params(params)
  return {'total': total, 'aux_head': aux, 'without_aux': total - aux}


def unstack(tree, i: int):
  """Slice ``i`` of a stacked (scanned) parameter or statistics tree."""
  return jax.tree.map(lambda x: x[i], tree)


__all__ = ['NetworkConfig', 'FixedNetwork', 'CellPlan', 'Branch', 'drop_path_keep_prob',
           'drop_path_progress', 'aux_head_init', 'aux_head_apply', 'loss', 'count_params',
           'parameter_counts', 'unstack']
