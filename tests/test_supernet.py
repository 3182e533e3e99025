"""Weight-sharing supernet: one compile for every architecture, dispatch back-ends agree, the
supernet computes the fixed network's cell for the same architecture, per-input weights are the
ones gathered, pool scoring in one call, training reduces the loss, evaluator resume."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nao_jax import preemption
from nao_jax.cnn import cpu_ops
from nao_jax.cnn import network as nw
from nao_jax.cnn import ops
from nao_jax.cnn import supernet as sn
from nao_jax.cnn import supernet_train as st
from nao_jax.cnn import ws_evaluator
from nao_jax.spaces import WS_SPACE, loose_ends

C, B, H = 4, 4, 8  # channels, batch, image side of every test network

# A normal and a reduction spec that between them use every op, stride 2 and 1 in the reduction
# cell, loose inputs (reduction: input 0 -> combine FactorizedReduce), and a y-branch identity on
# a cell input (PT's x-branch FactorizedReduce quirk, spec §9.1 #17).
NORMAL = [[0, 0, 1, 1], [2, 2, 0, 3], [1, 4, 3, 0], [2, 1, 2, 4], [5, 3, 2, 2]]
REDUCTION = [[1, 4, 1, 0], [2, 0, 1, 2], [1, 1, 3, 3], [4, 4, 1, 4], [2, 2, 5, 0]]
ARCH = np.array([NORMAL, REDUCTION], np.int32)


# Every network-level test (and the evaluator's) uses this recipe, so one compiled training step
# and one compiled scoring program serve the whole file.
NET_CONFIG = sn.SupernetConfig(layers=1, channels=C)
TRAIN_CONFIG = st.TrainConfig(batch_size=8, epochs=50, train_size=16)
VALID, SCORE_CAPACITY = 8, 4


class _CompileCounter:
  """Counts XLA compilations while ``active`` (public monitoring events)."""

  def __init__(self):
    self.count, self.active = 0, False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if self.active and event == '/jax/core/compile/backend_compile_duration':
      self.count += 1


COMPILES = _CompileCounter()


def _supernet(**kw) -> sn.Supernet:
  return sn.Supernet(sn.SupernetConfig(layers=1, channels=C, **kw))


def _init_cell(net, plan):
  return _jitted_init_cell(net.config, plan)(jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _jitted_init_cell(config, plan):
  return jax.jit(functools.partial(sn.Supernet(config).init_cell, plan=plan))


@functools.lru_cache(maxsize=None)
def _cell_fn(cell_index: int, **kw):
  """Jitted ``(params, stats, s0, s1, cell_arch, rng) -> (out, stats)`` of one supernet cell."""
  net = _supernet(**kw)
  plan = net.cells[cell_index]

  def fn(params, stats, s0, s1, cell_arch, rng):
    return net.cell_apply(plan, params, stats, s0, s1, cell_arch, train=True, rng=rng,
                          keep=None if rng is None else 0.7)
  return net, plan, jax.jit(fn)


def _cell_inputs(plan, key=1):
  (l0, c0), (l1, c1) = plan.in_shapes
  k0, k1 = jax.random.split(jax.random.key(key))
  return (jax.random.normal(k0, (B, H >> l0, H >> l0, c0)),
          jax.random.normal(k1, (B, H >> l1, H >> l1, c1)))


# -- one compilation serves every architecture -------------------------------------------------


def test_plan_reductions_channels_and_scanned_stages():
  net = sn.Supernet(sn.SupernetConfig(layers=3, channels=20))
  assert [c.index for c in net.cells if c.reduction] == [3, 7]
  assert [c.channels for c in net.cells] == [20] * 3 + [40] * 4 + [80] * 4
  assert net.segments == ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 7), (7, 8), (8, 9),
                          (9, 11))
  # Growing N only lengthens the scanned runs: the traced program has the same size.
  deep = sn.Supernet(sn.SupernetConfig(layers=6, channels=20))
  assert len(deep.segments) == len(net.segments)


def test_train_step_compiles_once_for_20_architectures_and_reduces_the_loss():
  net, opt, step = st.build_train_step(NET_CONFIG, TRAIN_CONFIG)
  state = st.create_state(net, opt, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (8, H, H, 3))
  labels = jnp.arange(8, dtype=jnp.int32) % 10
  archs = WS_SPACE.sample(np.random.default_rng(0), 20)
  assert len({a.tobytes() for a in archs}) == 20
  keys = [jax.random.key(i) for i in range(30)]
  state, metrics = step(state, images, labels, archs[0], keys[0])  # compiles (unless cached)
  COMPILES.count, COMPILES.active = 0, True
  for i, arch in enumerate(archs[1:], 1):
    state, metrics = step(state, images, labels, arch, keys[i])
    assert np.isfinite(float(metrics['loss']))
  COMPILES.active = False
  assert COMPILES.count == 0
  if hasattr(step, '_cache_size'):
    assert step._cache_size() == 1
  # The same program, one architecture and one batch: the loss goes down.
  losses = []
  for i in range(20, 30):
    state, metrics = step(state, images, labels, ARCH, keys[i])
    losses.append(float(metrics['loss']))
  assert int(state.step) == 30
  assert min(losses[-3:]) < losses[0] - 0.1, losses


# -- dispatch back-ends --------------------------------------------------------------------------


@pytest.mark.parametrize('cell_index', [2, 1], ids=['normal', 'reduction'])
def test_switch_and_select_agree_in_value_and_gradient(cell_index):
  results = {}
  archs = np.concatenate([ARCH[None], WS_SPACE.sample(np.random.default_rng(3), 2)])
  for dispatch in sn.DISPATCHES:
    net = _supernet(dispatch=dispatch)
    plan = net.cells[cell_index]
    params, stats = _init_cell(net, plan)
    s0, s1 = _cell_inputs(plan)

    def loss(params, s0, s1, cell_arch, net=net):
      out, new_stats = net.cell_apply(plan, params, stats, s0, s1, cell_arch, train=True,
                                      rng=jax.random.key(5), keep=0.7)
      return jnp.sum(jnp.sin(out)), new_stats

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    results[dispatch] = [fn(params, s0, s1, a[int(plan.reduction)]) for a in archs]
  for (v_sw, g_sw), (v_se, g_se) in zip(results['switch'], results['select']):
    chex.assert_trees_all_close(v_sw, v_se, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_sw, g_se, rtol=1e-4, atol=1e-5)


def test_cpu_depthwise_equals_library_in_value_and_gradient():
  for k, stride, size in [(5, 2, 8), (3, 1, 7)]:
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 1, 3))
    fast = lambda x, w: jnp.sum(jnp.sin(cpu_ops.depthwise_conv(x, w, stride, k // 2)))
    lib = lambda x, w: jnp.sum(jnp.sin(ops.conv2d(x, w, stride, ((k // 2,) * 2,) * 2,
                                                  groups=3)))
    chex.assert_trees_all_close(jax.jit(jax.value_and_grad(fast, (0, 1)))(x, w),
                                jax.jit(jax.value_and_grad(lib, (0, 1)))(x, w), rtol=1e-5,
                                atol=1e-5)


# -- the supernet computes the fixed network's cell ---------------------------------------------


def _fixed_plan(plan: sn.SuperCellPlan, cell: np.ndarray) -> nw.CellPlan:
  branches = tuple(nw.Branch(int(cell[k, s]), int(cell[k, s + 1]),
                             2 if plan.reduction and cell[k, s] < 2 else 1)
                   for k in range(5) for s in (0, 2))
  concat = tuple(loose_ends(cell))
  return nw.CellPlan(plan.index, plan.reduction, plan.channels, plan.in_shapes, branches,
                     concat, (plan.out_shape[0], len(concat) * plan.channels))


def _copy_into_fixed(net: sn.Supernet, plan, params, stats, cell: np.ndarray):
  """The fixed cell's parameters and statistics taken from the supernet's copies for ``cell``."""
  p_br, s_br = {}, {}
  for b in range(10):
    k, xy = divmod(b, 2)
    idx, op = int(cell[k, 2 * xy]), int(cell[k, 2 * xy + 1])
    name = net.op_names[op]
    key = f'node{k + 2}_{"xy"[xy]}'
    slot = k * (k + 3) // 2 + idx
    if name in net.param_ops:
      p_br[key] = jax.tree.map(lambda a: a[xy, slot], params['nodes'][name])
      s_br[key] = jax.tree.map(lambda a: a[k, xy], stats['nodes'][name])
    elif name == 'identity' and plan.reduction and idx < 2:
      owner = xy if net.config.y_branch_own_fr else 0
      p_br[key] = jax.tree.map(lambda a: a[owner, k, idx], params['nodes']['fr'])
      s_br[key] = jax.tree.map(lambda a: a[owner, k, idx], stats['nodes']['fr'])
    else:
      p_br[key], s_br[key] = {}, {}
  comb = {f'fr{i}': params['combine'][f'fr{i}'] for i in (0, 1)
          if plan.reduction and i in loose_ends(cell)}
  comb_s = {name: stats['combine'][name] for name in comb}
  return ({'calibrate': params['calibrate'], 'branches': p_br, 'combine': comb},
          {'calibrate': stats['calibrate'], 'branches': s_br, 'combine': comb_s})


@pytest.mark.parametrize('cell_index,own_fr', [(2, False), (1, False), (1, True)],
                         ids=['normal', 'reduction', 'reduction-own-fr'])
def test_supernet_cell_equals_fixed_cell(cell_index, own_fr):
  net, plan, cell_fn = _cell_fn(cell_index, y_branch_own_fr=own_fr)
  cell = ARCH[int(plan.reduction)]
  params, stats = _init_cell(net, plan)
  s0, s1 = _cell_inputs(plan)
  rng = jax.random.key(7)  # the same drop-path masks: both fold the branch index into it
  out, new_stats = cell_fn(params, stats, s0, s1, cell, rng)

  fixed = nw.FixedNetwork(WS_SPACE, ARCH, nw.NetworkConfig(layers=1, channels=C,
                                                           use_aux_head=False))
  fplan = _fixed_plan(plan, cell)
  fparams, fstats = _copy_into_fixed(net, plan, params, stats, cell)
  concat, fnew = jax.jit(functools.partial(fixed.cell_apply, fplan, train=True, keep=0.7))(
      fparams, fstats, s0, s1, rng=rng)
  # The supernet's cell output = BN(ReLU(concat of loose ends) @ [W_i for loose i]).
  w = jnp.concatenate([params['combine']['w'][i] for i in fplan.concat])
  expected, _ = ops.batch_norm(params['combine']['bn'], stats['combine']['bn'],
                               jax.nn.relu(concat) @ w, train=True)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  # WSBN: the shared running statistics of (node, branch, op) moved as the fixed branch's did.
  for b in range(10):
    k, xy = divmod(b, 2)
    name = net.op_names[int(cell[k, 2 * xy + 1])]
    if name in net.param_ops:
      chex.assert_trees_all_close(jax.tree.map(lambda a: a[k, xy], new_stats['nodes'][name]),
                                  fnew['branches'][f'node{k + 2}_{"xy"[xy]}'], rtol=1e-4,
                                  atol=1e-5)


def test_unused_input_weights_do_not_matter_and_get_no_gradient():
  net, plan, cell_fn = _cell_fn(2)
  cell = ARCH[0]
  params, stats = _init_cell(net, plan)
  s0, s1 = _cell_inputs(plan)
  used = np.zeros((2, sn.SLOTS), bool)  # (branch, slot) read by a parameterised op
  for k in range(5):
    for xy in (0, 1):
      if net.op_names[cell[k, 2 * xy + 1]] in net.param_ops:
        used[xy, k * (k + 3) // 2 + cell[k, 2 * xy]] = True
  # An op's copy is used only with that op: count per op.
  def perturb(params, which):
    nodes = dict(params['nodes'])
    for name in net.param_ops:
      mask = np.zeros((2, sn.SLOTS), bool)
      for k in range(5):
        for xy in (0, 1):
          if net.op_names[cell[k, 2 * xy + 1]] == name:
            mask[xy, k * (k + 3) // 2 + cell[k, 2 * xy]] = True
      sel = mask if which == 'used' else ~mask
      nodes[name] = jax.tree.map(
          lambda a: a + 0.5 * sel.reshape(sel.shape + (1,) * (a.ndim - 2)), nodes[name])
    return {**params, 'nodes': nodes}

  out, _ = cell_fn(params, stats, s0, s1, cell, None)
  out_unused, _ = cell_fn(perturb(params, 'unused'), stats, s0, s1, cell, None)
  out_used, _ = cell_fn(perturb(params, 'used'), stats, s0, s1, cell, None)
  np.testing.assert_array_equal(out, out_unused)
  assert np.max(np.abs(out - out_used)) > 1e-2

  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(cell_fn(p, stats, s0, s1, cell, None)[0]))))(
      params)
  for name in net.param_ops:
    g = np.abs(np.asarray(grads['nodes'][name]['pw1'])).sum(axis=(2, 3, 4, 5))  # [2, SLOTS]
    for k in range(5):
      for xy in (0, 1):
        slot = k * (k + 3) // 2 + cell[k, 2 * xy]
        if net.op_names[cell[k, 2 * xy + 1]] == name:
          assert g[xy, slot] > 0
          g[xy, slot] = 0
    assert not g.any(), f'{name}: gradient on weights of inputs the architecture does not read'
  # Combine blocks of used states get no gradient either (loose ends: 4 and 6).
  gw = np.abs(np.asarray(grads['combine']['w'])).sum(axis=(1, 2))
  assert (gw > 0).tolist() == [i in loose_ends(cell) for i in range(7)]


# -- scoring -------------------------------------------------------------------------------------


def test_scoring_a_pool_in_one_call_equals_one_at_a_time():
  net = sn.Supernet(NET_CONFIG)
  params, stats = net.init(jax.random.key(0))
  score = st.build_score_fn(NET_CONFIG)
  images = jax.random.normal(jax.random.key(1), (VALID, H, H, 3))
  labels = jax.random.randint(jax.random.key(2), (VALID,), 0, 10, jnp.int32)
  archs = WS_SPACE.sample(np.random.default_rng(4), 3)
  indices = np.stack([np.random.default_rng(i).permutation(VALID)[:6] for i in range(3)])
  indices = np.concatenate([indices, indices[:, :2]], 1).astype(np.int32)  # 8 per arch
  pad = lambda x: np.concatenate([x, np.repeat(x[:1], SCORE_CAPACITY - len(x), 0)])
  together, _ = score(params, stats, pad(archs), images, labels, pad(indices),
                      jnp.asarray(3, jnp.int32))
  assert float(together[3]) == 0.0  # padding is not computed
  apply = jax.jit(functools.partial(net.apply, train=True))
  for i in range(3):
    alone, _ = score(params, stats, pad(archs[i:i + 1]), images, labels, pad(indices[i:i + 1]),
                     jnp.asarray(1, jnp.int32))
    assert float(alone[0]) == float(together[i])
    logits, _ = apply(params, stats, images[indices[i]], archs[i])
    assert float(together[i]) == pytest.approx(
        float(np.mean(np.argmax(logits, -1) == np.asarray(labels)[indices[i]])))


# -- training ------------------------------------------------------------------------------------


def test_cosine_per_epoch_and_sampling_probabilities():
  lr = st.cosine_per_epoch(0.025, 0.001, 150, 10)
  assert float(lr(0)) == pytest.approx(0.025) and float(lr(9)) == pytest.approx(0.025)
  assert float(lr(10)) < 0.025 and float(lr(1499)) == pytest.approx(0.001, abs=1e-5)
  assert st.TrainConfig().steps_per_epoch == 704  # ceil(45000 / 64), as PT's loader
  archs = WS_SPACE.sample(np.random.default_rng(0), 3)
  np.testing.assert_allclose(st.sampling_probabilities(archs), [1 / 3] * 3)
  counts = st.standalone_param_counts(archs, layers=1, channels=8)
  for arch, count in zip(archs, counts):
    fixed = nw.FixedNetwork(WS_SPACE, arch, nw.NetworkConfig(layers=1, channels=8,
                                                             use_aux_head=False))
    assert count == nw.parameter_counts(fixed)['total']
  np.testing.assert_allclose(st.sampling_probabilities(archs, 'params', layers=1, channels=8),
                             counts / counts.sum())


# -- evaluator -----------------------------------------------------------------------------------


def _evaluator(checkpoint_callback=None, checkpoint_every=0):
  rng = np.random.default_rng(0)
  n = TRAIN_CONFIG.train_size
  x = rng.integers(0, 256, (n + VALID, H, H, 3), dtype=np.uint8)
  y = rng.integers(0, 10, n + VALID).astype(np.int32)
  cfg = ws_evaluator.WsEvaluatorConfig(
      supernet=NET_CONFIG, train=TRAIN_CONFIG, epochs_per_round=1, score_batch_size=VALID,
      score_capacity=SCORE_CAPACITY, log_every=0)
  return ws_evaluator.SupernetEvaluator(cfg, x[:n], y[:n], x[n:], y[n:],
                                        checkpoint_callback=checkpoint_callback,
                                        checkpoint_every=checkpoint_every)


def test_a_preemption_notice_checkpoints_the_step_and_stops_the_round():
  pool = WS_SPACE.sample(np.random.default_rng(1), 3)
  snapshots = {}
  evaluator = _evaluator(lambda: snapshots.setdefault(int(evaluator.state.step),
                                                      evaluator.state_dict()))
  preemption.request()  # as a SIGTERM would
  try:
    with pytest.raises(preemption.Preempted) as stopped:
      evaluator.start_round(pool, 0)  # 2 steps: stops after the first, checkpointed
  finally:
    preemption.reset()
  assert stopped.value.step == 1 and list(snapshots) == [1]
  arrays, meta = snapshots[1]
  assert meta['round'] == 0 and not meta['round_done']
  resumed = _evaluator()
  resumed.load_state_dict(arrays, meta)
  resumed.start_round(pool, 0)  # the rerun trains the remaining step
  assert int(resumed.state.step) == 2 and resumed.state_dict()[1]['round_done']


def test_evaluator_rounds_scores_and_resume():
  pool = WS_SPACE.sample(np.random.default_rng(1), 3)
  snapshots = {}
  full = _evaluator(lambda: snapshots.setdefault(int(full.state.step), full.state_dict()), 1)
  assert full.space is WS_SPACE and full.higher_is_better and not full.stationary
  full.start_round(pool, 0)                       # 2 steps (16 images, batch 8)
  records = full.evaluate(pool)
  assert [set(r) for r in records] == [{'score', 'cost'}] * 3
  assert all(0.0 <= r['score'] <= 1.0 for r in records)
  full.start_round(pool, 0)                       # already trained: nothing happens
  assert int(full.state.step) == 2
  full.start_round(pool, 1)
  arrays, meta = full.state_dict()
  assert meta['step'] == 4 and meta['round'] == 1 and meta['round_done']

  # A restart from the checkpoint taken after the first step of round 1 finishes the round.
  resumed = _evaluator()
  arrays3, meta3 = snapshots[3]
  assert meta3['round'] == 1 and not meta3['round_done']
  resumed.load_state_dict(arrays3, meta3)
  resumed.start_round(pool, 1)
  assert int(resumed.state.step) == 4
  chex.assert_trees_all_close(resumed.state.params, full.state.params, rtol=1e-5, atol=1e-6)
  assert [r['score'] for r in resumed.evaluate(pool)] == [r['score'] for r in
                                                            full.evaluate(pool)]
  with pytest.raises(ValueError, match='different pool'):
    resumed.start_round(pool[::-1], 1)
