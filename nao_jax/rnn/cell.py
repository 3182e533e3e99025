"""The NAO / DARTS recurrent cell (spec §2.4) as pure functions.

One time step with input ``x`` and previous hidden state ``h`` (masks ``m_x``, ``m_h`` are the
per-sequence variational-dropout masks; all ones in evaluation)::

  [c0 | g0] = [x * m_x ; h * m_h] @ W0                 W0: float32[E + H, 2H], no bias
  s0        = h + sigmoid(c0) * (tanh(g0) - h)
  [c | g]   = (s_p * m_h) @ W_i                        W_i: float32[H, 2H], no bias, node i = 1..11
  s_i       = s_p + sigmoid(c) * (f_a(g) - s_p)        p = pred of node i, f_a its activation
  h_t       = mean(s_1 .. s_11)                        ('exclude_s0'; 'include_s0' adds s_0)

Two builders share these equations; tests check both, values and all gradients, against JAX
autodiff of ``fixed_cell_step`` (the step written plainly, one matmul per node):

* The **fixed cell** (final training) turns an architecture into a static ``CellPlan`` at trace
  time. ``fixed_recurrence`` is the fast path: ``x @ W0[:E]`` for all time steps is one matmul
  outside the time loop, nodes that read the same predecessor share one matmul (their weights are
  concatenated along the output axis), and a hand-written VJP keeps only data gradients inside the
  reverse time loop; every weight gradient is one ``[H, T*B] @ [T*B, k*2H]`` matmul after it.
  Inside the loops arrays are feature-major (``[H, B]``), the faster matmul orientation on
  XLA:CPU.
* The **weight-sharing cell** (WS-RNN supernet, spec §5.3) takes the architecture as traced
  ``int32[11, 2]`` data, so one compilation serves every architecture. Node ``i`` (0-based) owns
  ``4 * (i + 1)`` blocks of ``float32[H, 2H]``, one per (predecessor, activation), block
  ``pred * 4 + act`` as in the reference; all 264 blocks are stacked in one array. The 11 blocks
  of an architecture are gathered once per call (the architecture is constant over the window),
  the predecessor is read from a stacked state buffer with a dynamic index, and the activation is
  a select over all four candidates (no ``lax.switch`` inside the scan). It uses the same layout
  and the same kind of hand-written VJP (one matmul per node).

Activation ids mean nothing without a mapping: every builder takes the tuple of activation names
(``space.activations`` of ``nao_jax.spaces.rnn``) explicitly.

Shapes: ``T`` time steps, ``B`` batch, ``E`` input (embedding) size, ``H`` hidden size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

STEPS = 11
NUM_ACTIVATIONS = 4
OUTPUT_AVERAGES = ('exclude_s0', 'include_s0')

Array = jax.Array
Params = dict[str, Array]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'tanh': jnp.tanh,
    'relu': jax.nn.relu,
    'identity': lambda v: v,
    'sigmoid': jax.nn.sigmoid,
}


def _activation_grad(name: str, out: Array) -> Array:
  """Derivative of activation ``name`` expressed through its output (saves storing inputs)."""
  if name == 'tanh':
    return 1.0 - out * out
  if name == 'sigmoid':
    return out * (1.0 - out)
  if name == 'relu':
    return (out > 0).astype(out.dtype)  # jax.nn.relu also uses 0 at 0
  if name == 'identity':
    return jnp.ones_like(out)
  raise ValueError(f'unknown activation {name!r}')


def _check_activations(activations: Sequence[str]) -> tuple[str, ...]:
  activations = tuple(activations)
  unknown = [a for a in activations if a not in ACTIVATIONS]
  if unknown or len(activations) != NUM_ACTIVATIONS:
    raise ValueError(f'activations must be {NUM_ACTIVATIONS} names from {sorted(ACTIVATIONS)}, '
                     f'got {activations}')
  return activations


def _output_nodes(output_average: str) -> tuple[int, ...]:
  if output_average not in OUTPUT_AVERAGES:
    raise ValueError(f'output_average must be one of {OUTPUT_AVERAGES}, got {output_average!r}')
  return tuple(range(0 if output_average == 'include_s0' else 1, STEPS + 1))


# -- parameters ----------------------------------------------------------------------------------


def init_fixed_cell(key: Array, emb_size: int, hidden_size: int,
                    init_range: float = 0.04) -> Params:
  """Uniform(±init_range) weights of a fixed cell (reference init, spec §6.8).

  Returns:
    ``{'w0': float32[E + H, 2H], 'w': float32[11, H, 2H]}``; ``w[i]`` belongs to node ``s_{i+1}``.
  """
  k0, k1 = jax.random.split(key)
  h2 = 2 * hidden_size
  return {
      'w0': jax.random.uniform(k0, (emb_size + hidden_size, h2), jnp.float32,
                               -init_range, init_range),
      'w': jax.random.uniform(k1, (STEPS, hidden_size, h2), jnp.float32, -init_range, init_range),
  }


def num_ws_blocks(num_activations: int = NUM_ACTIVATIONS) -> int:
  """Number of ``[H, 2H]`` blocks of the WS cell: ``num_activations * (1 + 2 + ... + 11)``."""
  return num_activations * STEPS * (STEPS + 1) // 2


def init_ws_cell(key: Array, emb_size: int, hidden_size: int,
                 init_range: float = 0.04) -> Params:
  """Uniform(±init_range) weights of the weight-sharing cell.

  Returns:
    ``{'w0': float32[E + H, 2H], 'w': float32[264, H, 2H]}``; see ``ws_block_index``.
  """
  k0, k1 = jax.random.split(key)
  h2 = 2 * hidden_size
  return {
      'w0': jax.random.uniform(k0, (emb_size + hidden_size, h2), jnp.float32,
                               -init_range, init_range),
      'w': jax.random.uniform(k1, (num_ws_blocks(), hidden_size, h2), jnp.float32,
                              -init_range, init_range),
  }


def ws_block_index(arch: Array) -> Array:
  """Row of ``params['w']`` used by each node of ``arch`` in the weight-sharing cell.

  Node ``i`` (0-based) starts at ``4 * i * (i + 1) / 2`` (the blocks of nodes ``0..i-1``); inside
  it, block ``pred * 4 + act`` as the reference's per-node ``(4 (i+1) H) x 2H`` matrix.

  Args:
    arch: ``int32[11, 2]`` rows ``[pred, act]`` (numpy or traced).

  Returns:
    ``int32[11]``.
  """
  arch = jnp.asarray(arch, jnp.int32)
  node = jnp.arange(STEPS, dtype=jnp.int32)
  start = NUM_ACTIVATIONS * node * (node + 1) // 2
  return start + arch[:, 0] * NUM_ACTIVATIONS + arch[:, 1]


def ws_gather(params: Params, arch: Array) -> Params:
  """The fixed-cell weights ``{'w0', 'w': float32[11, H, 2H]}`` that ``arch`` uses in the supernet."""
  return {'w0': params['w0'], 'w': jnp.take(params['w'], ws_block_index(arch), axis=0)}


# -- the plain step (reference for the fast paths) -----------------------------------------------


def _highway(s_prev: Array, pre: Array, act: Callable[[Array], Array]) -> Array:
  hidden = s_prev.shape[-1]
  c = jax.nn.sigmoid(pre[..., :hidden])
  return s_prev + c * (act(pre[..., hidden:]) - s_prev)


def fixed_cell_step(params: Params, arch: np.ndarray, activations: Sequence[str], x: Array,
                    h_prev: Array, m_x: Array | None = None, m_h: Array | None = None,
                    output_average: str = 'exclude_s0') -> Array:
  """One time step written plainly: one matmul per node, differentiated by JAX.

  Args:
    params: ``{'w0': float32[E + H, 2H], 'w': float32[11, H, 2H]}``.
    arch: ``int[11, 2]`` concrete architecture.
    activations: the 4 activation names of the architecture's id mapping.
    x: ``float32[B, E]``.
    h_prev: ``float32[B, H]``.
    m_x: ``float32[B, E]`` dropout mask on ``x`` (scaled by 1/keep), or None.
    m_h: ``float32[B, H]`` dropout mask on ``h_prev`` and every ``s_p``, or None.
    output_average: ``'exclude_s0'`` (final models) or ``'include_s0'`` (WS-RNN supernet).

  Returns:
    ``float32[B, H]`` the new hidden state (= cell output).
  """
  activations = _check_activations(activations)
  arch = np.asarray(arch)
  mx = x if m_x is None else x * m_x
  mh = h_prev if m_h is None else h_prev * m_h
  states = [_highway(h_prev, jnp.concatenate([mx, mh], -1) @ params['w0'], jnp.tanh)]
  for i in range(STEPS):
    s_p = states[int(arch[i, 0])]
    a = s_p if m_h is None else s_p * m_h
    states.append(_highway(s_p, a @ params['w'][i], ACTIVATIONS[activations[int(arch[i, 1])]]))
  return jnp.mean(jnp.stack([states[j] for j in _output_nodes(output_average)]), 0)


# -- fixed cell: static plan, fused matmuls, hand-written VJP ------------------------------------


@dataclasses.dataclass(frozen=True)
class CellPlan:
  """Static structure of a fixed cell.

  Attributes:
    preds: predecessor state index of nodes ``s_1..s_11``.
    acts: activation name of nodes ``s_1..s_11``.
    output_nodes: state indices averaged into the output.
    groups: ``(pred, (node, ...))`` sorted by ``pred``; the nodes of a group read the same state
      and share one matmul. Processing groups in this order respects the data dependencies
      (a node's predecessor has a smaller index than the node).
  """

  preds: tuple[int, ...]
  acts: tuple[str, ...]
  output_nodes: tuple[int, ...]
  groups: tuple[tuple[int, tuple[int, ...]], ...]


def make_plan(arch, activations: Sequence[str], output_average: str = 'exclude_s0',
              fuse: bool = True) -> CellPlan:
  """Builds the static plan of a concrete architecture.

  Args:
    arch: ``int[11, 2]`` rows ``[pred, act]``.
    activations: the 4 activation names of the id mapping (``space.activations``).
    output_average: ``'exclude_s0'`` or ``'include_s0'``.
    fuse: group nodes with the same predecessor into one matmul (exact; off only to measure).

  Raises:
    ValueError: malformed architecture or mapping.
  """
  activations = _check_activations(activations)
  arch = np.asarray(arch)
  if arch.shape != (STEPS, 2):
    raise ValueError(f'arch must have shape ({STEPS}, 2), got {arch.shape}')
  preds = tuple(int(p) for p in arch[:, 0])
  for i, p in enumerate(preds):
    if not 0 <= p <= i:
      raise ValueError(f'node s{i + 1} reads s{p}; allowed s0..s{i}')
  acts = tuple(activations[int(a)] for a in arch[:, 1])
  if fuse:
    groups = tuple((p, tuple(i + 1 for i in range(STEPS) if preds[i] == p))
                   for p in sorted(set(preds)))
  else:
    groups = tuple((p, (i + 1,)) for i, p in enumerate(preds))
  return CellPlan(preds, acts, _output_nodes(output_average), groups)


def _group_weights(plan: CellPlan, w: Array) -> list[Array]:
  """``float32[H, k * 2H]`` per group: the group's node weights side by side."""
  return [jnp.concatenate([w[n - 1] for n in nodes], -1) if len(nodes) > 1 else w[nodes[0] - 1]
          for _, nodes in plan.groups]


def _masked(v: Array, m: Array | None) -> Array:
  return v if m is None else v * m


# The fused recurrence works feature-major: every per-step array is [features, B] and every
# matmul is W^T [K, H] @ s [H, B]. On XLA:CPU, [64, 850] @ [850, 1700]-like products run at
# ~0.7-0.85 of a large matmul's FLOP rate, their transposes [1700, 850] @ [850, 64] at ~1.05
# (measured on the 2-core dev box); transposing the inputs and outputs of a window is cheap.


def _plan_step(plan: CellPlan, w0h_t: Array, wg_t: list[Array], m_h: Array | None,
               h_prev: Array, xc: Array) -> tuple[Array, list[Array], list[Array], list[Array]]:
  """One feature-major step of the fixed cell.

  Args:
    plan: the cell.
    w0h_t: ``float32[2H, H]`` = ``W0[E:].T``.
    wg_t: per group ``float32[k * 2H, H]``, the transposed group weights.
    m_h: ``float32[H, B]`` or None.
    h_prev: ``float32[H, B]``.
    xc: ``float32[2H, B]`` = ``((x * m_x) @ W0[:E]).T``.

  Returns:
    ``(h, states, gates, cands)``, all ``float32[H, B]``; ``states[j]`` is ``s_j``,
    ``gates[j]`` = sigmoid(c_j) and ``cands[j]`` = f(g_j), ``j = 0..11``; the last two are what
    the backward pass needs.
  """
  hidden = h_prev.shape[0]
  pre0 = xc + w0h_t @ _masked(h_prev, m_h)
  c0 = jax.nn.sigmoid(pre0[:hidden])
  g0 = jnp.tanh(pre0[hidden:])
  states: list = [h_prev + c0 * (g0 - h_prev)] + [None] * STEPS
  gates: list = [c0] + [None] * STEPS
  cands: list = [g0] + [None] * STEPS
  for (p, nodes), w_t in zip(plan.groups, wg_t):
    s_p = states[p]
    pre = w_t @ _masked(s_p, m_h)
    for k, n in enumerate(nodes):
      c = jax.nn.sigmoid(pre[2 * k * hidden:(2 * k + 1) * hidden])
      g = ACTIVATIONS[plan.acts[n - 1]](pre[(2 * k + 1) * hidden:(2 * k + 2) * hidden])
      states[n], gates[n], cands[n] = s_p + c * (g - s_p), c, g
  h = sum(states[j] for j in plan.output_nodes) / len(plan.output_nodes)
  return h, states, gates, cands


def _read_states(plan: CellPlan) -> tuple[int, ...]:
  """States some node reads (the backward pass needs only these, not the leaves)."""
  return tuple(sorted(set(plan.preds)))


def _scan_forward(plan, w0h, w, xc, h0, m_h, save: bool):
  """Feature-major forward over a window; ``xc`` is ``float32[T, 2H, B]``, ``h0`` ``[H, B]``."""
  wg_t = [g.T for g in _group_weights(plan, w)]  # transposed once per window, not per step
  w0h_t = w0h.T

  def step(h_prev, xc_t):
    h, states, gates, cands = _plan_step(plan, w0h_t, wg_t, m_h, h_prev, xc_t)
    if not save:
      return h, h
    # Flat tuples, not stacked arrays: each residual is written straight into its own [T, H, B]
    # buffer (a stack costs an extra copy per step).
    return h, (h, tuple(states[p] for p in _read_states(plan)), tuple(gates), tuple(cands))

  return jax.lax.scan(step, h0, xc)


def _input_projection(w0: Array, xs: Array, m_x: Array | None) -> Array:
  """``(x * m_x) @ W0[:E]`` for every step at once: ``float32[T, B, E]`` -> ``float32[T, B, 2H]``.

  Flattened to one 2-D ``[T*B, E] @ [E, 2H]`` matmul, whose gradients are 2-D matmuls as well
  (a 3-D operand makes XLA transpose copies for the weight gradient).
  """
  steps, batch, emb = xs.shape
  flat = _masked(xs, m_x).reshape(steps * batch, emb) @ w0[:emb]
  return flat.reshape(steps, batch, -1)


def _feature_major(v: Array) -> Array:
  """``[..., B, F]`` -> ``[..., F, B]``."""
  return jnp.swapaxes(v, -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_recurrence(plan: CellPlan, w0h: Array, w: Array, xc: Array, h0: Array,
                      m_h: Array | None) -> Array:
  """``float32[T, B, H]`` outputs from ``xc`` ``[T, B, 2H]``, ``h0`` ``[B, H]``, ``m_h`` ``[B, H]``."""
  m_h = None if m_h is None else m_h.T
  hs = _scan_forward(plan, w0h, w, _feature_major(xc), h0.T, m_h, save=False)[1]
  return _feature_major(hs)


def _fused_fwd(plan, w0h, w, xc, h0, m_h):
  m_h = None if m_h is None else m_h.T
  h0 = h0.T
  _, (hs, states, gates, cands) = _scan_forward(plan, w0h, w, _feature_major(xc), h0, m_h,
                                                save=True)
  h_prevs = jnp.concatenate([h0[None], hs[:-1]], 0)
  return _feature_major(hs), (w0h, w, h_prevs, states, gates, cands, m_h)


def _fused_bwd(plan, res, d_hs):
  """Reverse time loop with data gradients only; weight gradients as big matmuls afterwards."""
  w0h, w, h_prevs, states, gates, cands, m_h = res  # feature-major [T, H, B] residuals
  wg = _group_weights(plan, w)  # [H, k * 2H]: dS = W @ dPre in feature-major layout
  n_out = len(plan.output_nodes)

  def step(dh_next, xs):
    d_out, h_prev, read, c, g = xs
    s = dict(zip(_read_states(plan), read))
    dh = d_out + dh_next
    ds = [jnp.zeros_like(dh) if j not in plan.output_nodes else dh / n_out
          for j in range(STEPS + 1)]
    dpres = []
    for (p, nodes), w_g in reversed(list(zip(plan.groups, wg))):
      parts = []
      for n in nodes:  # ds[n] is complete: nodes reading s_n come later and were done first
        dc = ds[n] * (g[n] - s[p])
        ds[p] = ds[p] + ds[n] * (1.0 - c[n])
        parts += [dc * c[n] * (1.0 - c[n]),
                  ds[n] * c[n] * _activation_grad(plan.acts[n - 1], g[n])]
      dpre = jnp.concatenate(parts, 0)
      ds[p] = ds[p] + _masked(w_g @ dpre, m_h)
      dpres.append(dpre)
    dc0 = ds[0] * (g[0] - h_prev)
    dpre0 = jnp.concatenate([dc0 * c[0] * (1.0 - c[0]), ds[0] * c[0] * (1.0 - g[0] * g[0])], 0)
    dh_prev = ds[0] * (1.0 - c[0]) + _masked(w0h @ dpre0, m_h)
    return dh_prev, (dpre0, tuple(reversed(dpres)))

  dh0, (dpre0, dpres) = jax.lax.scan(step, jnp.zeros_like(h_prevs[0]),
                                     (_feature_major(d_hs), h_prevs, states, gates, cands),
                                     reverse=True)

  def weight_grad(inputs, dpre):
    # Sum over time and batch as one 2-D [H, T*B] @ [T*B, K] matmul (operands transposed into
    # that layout first; a 3-D einsum lets XLA pick slower copies).
    inputs = _masked(inputs, m_h)
    lhs = jnp.swapaxes(inputs, 0, 1).reshape(inputs.shape[1], -1)
    rhs = jnp.swapaxes(dpre, 1, 2).reshape(-1, dpre.shape[1])
    return lhs @ rhs

  dw0h = weight_grad(h_prevs, dpre0)
  dw = [None] * STEPS
  hidden = w.shape[1]
  for (p, nodes), dpre in zip(plan.groups, dpres):
    dwg = weight_grad(states[_read_states(plan).index(p)], dpre)
    for k, n in enumerate(nodes):
      dw[n - 1] = dwg[:, 2 * k * hidden:(2 * k + 2) * hidden]
  return dw0h, jnp.stack(dw), _feature_major(dpre0), dh0.T, None  # None: masks are constants


_fused_recurrence.defvjp(_fused_fwd, _fused_bwd)


def fixed_recurrence(params: Params, plan: CellPlan, xs: Array, h0: Array,
                     m_x: Array | None = None, m_h: Array | None = None) -> Array:
  """Runs the fixed cell over a window (fast path, see the module docstring).

  Args:
    params: ``{'w0': float32[E + H, 2H], 'w': float32[11, H, 2H]}``.
    plan: from ``make_plan``.
    xs: ``float32[T, B, E]`` inputs.
    h0: ``float32[B, H]`` hidden state before the window.
    m_x: ``float32[B, E]`` mask on the inputs (constant over time), or None.
    m_h: ``float32[B, H]`` mask on ``h_prev`` and every ``s_p``, or None.

  Returns:
    ``float32[T, B, H]`` hidden states (= outputs); the last row is the state to carry.
  """
  xc = _input_projection(params['w0'], xs, m_x)
  return _fused_recurrence(plan, params['w0'][xs.shape[-1]:], params['w'], xc, h0, m_h)


# -- weight-sharing cell: architecture as data ---------------------------------------------------


def _select_activation(v: Array, act_id: Array, activations: tuple[str, ...]) -> Array:
  """``f_{act_id}(v)`` for a traced id: all four candidates, then a select chain."""
  out = ACTIVATIONS[activations[-1]](v)
  for k in range(len(activations) - 2, -1, -1):
    out = jnp.where(act_id == k, ACTIVATIONS[activations[k]](v), out)
  return out


def _select_activation_grad(out: Array, act_id: Array, activations: tuple[str, ...]) -> Array:
  """Derivative of ``f_{act_id}`` at the point where it produced ``out``, for a traced id."""
  grad = _activation_grad(activations[-1], out)
  for k in range(len(activations) - 2, -1, -1):
    grad = jnp.where(act_id == k, _activation_grad(activations[k], out), grad)
  return grad


@dataclasses.dataclass(frozen=True)
class _WsStatic:
  activations: tuple[str, ...]
  output_nodes: tuple[int, ...]


def _ws_scan_forward(static: _WsStatic, w0h, w, arch, xc, h0, m_h, save: bool):
  """Feature-major WS forward; ``w`` is the gathered ``float32[11, H, 2H]``."""
  hidden = h0.shape[0]
  # Transposed once per window, and split: slicing a stacked [11, 2H, H] inside the loop copies.
  w_t = [w[i].T for i in range(STEPS)]
  w0h_t = w0h.T
  first = static.output_nodes[0]

  def step(h_prev, xc_t):
    pre0 = xc_t + w0h_t @ _masked(h_prev, m_h)
    c0 = jax.nn.sigmoid(pre0[:hidden])
    g0 = jnp.tanh(pre0[hidden:])
    buf = jnp.zeros((STEPS + 1,) + h_prev.shape, h_prev.dtype)
    buf = buf.at[0].set(h_prev + c0 * (g0 - h_prev))
    gates, cands = [c0], [g0]
    for i in range(STEPS):
      s_p = jax.lax.dynamic_index_in_dim(buf, arch[i, 0], keepdims=False)
      pre = w_t[i] @ _masked(s_p, m_h)
      c = jax.nn.sigmoid(pre[:hidden])
      g = _select_activation(pre[hidden:], arch[i, 1], static.activations)
      buf = buf.at[i + 1].set(s_p + c * (g - s_p))
      gates.append(c)
      cands.append(g)
    h = jnp.mean(buf[first:], 0)
    if not save:
      return h, h
    return h, (h, buf, tuple(gates), tuple(cands))

  return jax.lax.scan(step, h0, xc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ws_fused(static: _WsStatic, w0h: Array, w: Array, arch: Array, xc: Array, h0: Array,
              m_h: Array | None) -> Array:
  """``float32[T, B, H]`` outputs; as ``_fused_recurrence`` with the architecture as data."""
  m_h = None if m_h is None else m_h.T
  hs = _ws_scan_forward(static, w0h, w, arch, _feature_major(xc), h0.T, m_h, save=False)[1]
  return _feature_major(hs)


def _ws_fwd(static, w0h, w, arch, xc, h0, m_h):
  m_h = None if m_h is None else m_h.T
  h0 = h0.T
  _, (hs, states, gates, cands) = _ws_scan_forward(static, w0h, w, arch, _feature_major(xc), h0,
                                                   m_h, save=True)
  h_prevs = jnp.concatenate([h0[None], hs[:-1]], 0)
  return _feature_major(hs), (w0h, w, arch, h_prevs, states, gates, cands, m_h)


def _ws_bwd(static, res, d_hs):
  """As ``_fused_bwd``; the predecessor of each node is a dynamic index into the state buffer.

  Nodes are visited in reverse order, so the gradient of ``s_{i+1}`` is complete when node
  ``i + 1`` is reached (only later nodes read it), whatever the architecture.
  """
  w0h, w, arch, h_prevs, states, gates, cands, m_h = res  # residuals feature-major [T, ., H, B]
  n_out = len(static.output_nodes)
  first = static.output_nodes[0]

  def step(dh_next, xs):
    d_out, h_prev, s, c, g = xs
    dh = d_out + dh_next
    ds = jnp.zeros_like(s).at[first:].set(jnp.broadcast_to(dh / n_out, s[first:].shape))
    dpres = []
    for i in range(STEPS - 1, -1, -1):
      n, p = i + 1, arch[i, 0]
      s_p = jax.lax.dynamic_index_in_dim(s, p, keepdims=False)
      ds_n = ds[n]
      dc = ds_n * (g[n] - s_p)
      dpre = jnp.concatenate(
          [dc * c[n] * (1.0 - c[n]),
           ds_n * c[n] * _select_activation_grad(g[n], arch[i, 1], static.activations)], 0)
      ds_p = ds_n * (1.0 - c[n]) + _masked(w[i] @ dpre, m_h)
      ds = jax.lax.dynamic_update_index_in_dim(
          ds, jax.lax.dynamic_index_in_dim(ds, p, keepdims=False) + ds_p, p, 0)
      dpres.append(dpre)
    dc0 = ds[0] * (g[0] - h_prev)
    dpre0 = jnp.concatenate([dc0 * c[0] * (1.0 - c[0]), ds[0] * c[0] * (1.0 - g[0] * g[0])], 0)
    dh_prev = ds[0] * (1.0 - c[0]) + _masked(w0h @ dpre0, m_h)
    return dh_prev, (dpre0, tuple(reversed(dpres)))

  dh0, (dpre0, dpres) = jax.lax.scan(step, jnp.zeros_like(h_prevs[0]),
                                     (_feature_major(d_hs), h_prevs, states, gates, cands),
                                     reverse=True)

  def weight_grad(inputs, dpre):
    inputs = _masked(inputs, m_h)
    lhs = jnp.swapaxes(inputs, 0, 1).reshape(inputs.shape[1], -1)
    rhs = jnp.swapaxes(dpre, 1, 2).reshape(-1, dpre.shape[1])
    return lhs @ rhs

  dw0h = weight_grad(h_prevs, dpre0)
  dw = jnp.stack([weight_grad(jnp.take(states, arch[i, 0], axis=1), dpres[i])
                  for i in range(STEPS)])
  return dw0h, dw, None, _feature_major(dpre0), dh0.T, None


_ws_fused.defvjp(_ws_fwd, _ws_bwd)


def ws_recurrence(params: Params, arch: Array, activations: Sequence[str], xs: Array, h0: Array,
                  m_x: Array | None = None, m_h: Array | None = None,
                  output_average: str = 'exclude_s0') -> Array:
  """Runs the weight-sharing cell over a window; ``arch`` is data (one compile for all archs).

  Same layout and hand-written VJP as ``fixed_recurrence`` (weight gradients as big matmuls
  after the reverse time loop), with one matmul per node, the predecessor read from the stacked
  state buffer ``float32[12, H, B]`` by a dynamic index, and the activation (and its derivative)
  picked by a select over the four candidates.

  Args:
    params: ``{'w0': float32[E + H, 2H], 'w': float32[264, H, 2H]}``.
    arch: ``int32[11, 2]`` rows ``[pred, act]`` (may be traced).
    activations: the 4 activation names of the id mapping (``space.activations``).
    xs: ``float32[T, B, E]``.
    h0: ``float32[B, H]``.
    m_x: ``float32[B, E]`` or None.
    m_h: ``float32[B, H]`` or None.
    output_average: ``'exclude_s0'`` (default: the final model's mean over ``s_1..s_11``, which
      removes the reference's search/eval mismatch, spec §9.1 #16) or ``'include_s0'`` (the
      WS-RNN reference, mean over ``s_0..s_11``).

  Returns:
    ``float32[T, B, H]``.
  """
  static = _WsStatic(_check_activations(activations), _output_nodes(output_average))
  arch = jnp.asarray(arch, jnp.int32)
  w = ws_gather(params, arch)['w']  # the window uses one architecture: gather once, not per step
  xc = _input_projection(params['w0'], xs, m_x)
  return _ws_fused(static, params['w0'][xs.shape[-1]:], w, arch, xc, h0, m_h)
