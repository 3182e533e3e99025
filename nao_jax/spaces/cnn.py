"""NASNet-style CNN cell spaces: the 5-op weight-sharing space and the 11-op NAONet space.

An architecture is ``int32[2, NODES, 4]``: cell 0 is the normal cell, cell 1 the reduction cell,
and each node ``k`` (0-based; it is node ``k + 2`` of the cell) holds ``[x_id, x_op, y_id, y_op]``:
two branches, each reading state ``x_id`` / ``y_id`` in ``[0, k + 2)`` (0 = h_{i-2}, 1 = h_{i-1},
``j >= 2`` = node ``j``) through op ``x_op`` / ``y_op`` (ids local to the space, ``OPS[id]``).
The node output is the sum of its two branches; the cell output concatenates the loose ends
(states, inputs included, that no node reads). See spec §2.1-§2.3.

Tokenisations (exactly those of the reference code):

* 5-op space (TF-WS-CNN / PT-V1): per node ``[x_id+1, x_op+7, y_id+1, y_op+7]``, 40 tokens,
  vocabulary 12 (0 SOS, 1..6 inputs, 7..11 ops); the encoder reads one branch (2 tokens) per step.
* 11-op space (TF-NAO-CNN ``VOCAB2``): per node ``[in, type, size, in, type, size]``, 60 tokens,
  vocabulary 21; one branch (3 tokens) per encoder step. Identity is written ``identity 1x1``.
"""

from __future__ import annotations

import itertools
from typing import Hashable, Sequence

import numpy as np

from nao_jax.spaces.base import SearchSpace, check_shape, parse_int_string

NODES = 5
CELL_NAMES = ('normal', 'reduction')

# Op ids of the 5-op space, in the code's order (spec §2.3; NOT the supplementary's listing order).
WS_OPS = ('sep_conv_3x3', 'sep_conv_5x5', 'avg_pool_3x3', 'max_pool_3x3', 'identity')

# The 11 NAONet ops, numbered as NAO-V2's OPERATIONS_large (0..10). PT-V1 scripts write these ids
# shifted by 5 (5..15), because its ids 0..4 are the 5 WS ops.
NAO_OPS = ('identity', 'conv_1x1', 'conv_3x3', 'conv_1x3_3x1', 'conv_1x7_7x1', 'max_pool_2x2',
           'max_pool_3x3', 'max_pool_5x5', 'avg_pool_2x2', 'avg_pool_3x3', 'avg_pool_5x5')
PT_V1_NAO_OP_OFFSET = 5

# TF-NAO-CNN VOCAB2 (spec §2.2): ids of the op-type and op-size tokens.
_TF_TOKENS = {'identity': 7, 'sep_conv': 8, 'conv': 9, 'dil_sep_conv': 10, 'avg_pool': 11,
              'max_pool': 12, 'min_pool': 13, '1x1': 14, '2x2': 15, '3x3': 16, '5x5': 17,
              '7x7': 18, '1x3+3x1': 19, '1x7+7x1': 20}
_NAO_OP_TYPE_SIZE = (('identity', '1x1'), ('conv', '1x1'), ('conv', '3x3'), ('conv', '1x3+3x1'),
                     ('conv', '1x7+7x1'), ('max_pool', '2x2'), ('max_pool', '3x3'),
                     ('max_pool', '5x5'), ('avg_pool', '2x2'), ('avg_pool', '3x3'),
                     ('avg_pool', '5x5'))
NAO_OP_TOKENS = np.array([[_TF_TOKENS[t], _TF_TOKENS[s]] for t, s in _NAO_OP_TYPE_SIZE], np.int32)


def loose_ends(cell: np.ndarray) -> list[int]:
  """States of one cell (``int[NODES, 4]``) that no node reads, in index order (spec §2.1)."""
  cell = np.asarray(cell)
  used = set(cell[:, 0].tolist()) | set(cell[:, 2].tolist())
  return [i for i in range(cell.shape[0] + 2) if i not in used]


class CnnSpace(SearchSpace):
  """A NASNet-style two-cell space with ``NODES`` nodes per cell.

  Args:
    name: registry name.
    ops: op names; op id = position.
    tokens_per_branch: 2 (``[input, op]``, WS spaces) or 3 (``[input, type, size]``, 11-op).
    official_op_offset: added to op ids in the official integer string (5 for PT-V1's 11 ops).
  """

  def __init__(self, name: str, ops: Sequence[str], tokens_per_branch: int,
               official_op_offset: int = 0):
    if tokens_per_branch not in (2, 3):
      raise ValueError(f'tokens_per_branch must be 2 or 3, got {tokens_per_branch}')
    self.name = name
    self.ops = tuple(ops)
    self.num_ops = len(self.ops)
    self.nodes = NODES
    self.arch_shape = (2, NODES, 4)
    self.tokens_per_branch = tokens_per_branch
    self.tokens_per_step = tokens_per_branch
    self.seq_len = 2 * NODES * 2 * tokens_per_branch
    self.num_inputs = NODES + 1  # largest input id is NODES (node 4 may read node 5 = index 5)
    self.vocab_size = (1 + self.num_inputs + self.num_ops if tokens_per_branch == 2
                       else 1 + max(_TF_TOKENS.values()))
    self.official_op_offset = official_op_offset
    self.official_format = (
        f'{2 * NODES * 4} integers: per cell (normal, then reduction) and node, '
        f'x_id x_op y_id y_op; op ids {official_op_offset}..{official_op_offset + self.num_ops - 1}')
    self._mask_table = self._build_mask_table()
    self._swaps = self._build_swaps()

  # -- sampling and validation ----------------------------------------------------------------

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    archs = np.empty((n, 2, NODES, 4), np.int32)
    for k in range(NODES):
      archs[:, :, k, 0] = rng.integers(0, k + 2, (n, 2))
      archs[:, :, k, 1] = rng.integers(0, self.num_ops, (n, 2))
      archs[:, :, k, 2] = rng.integers(0, k + 2, (n, 2))
      archs[:, :, k, 3] = rng.integers(0, self.num_ops, (n, 2))
    return archs

  def validate(self, arch) -> np.ndarray:
    arch = check_shape(arch, self.arch_shape, self.name)
    for c, k, slot in itertools.product(range(2), range(NODES), range(4)):
      value = int(arch[c, k, slot])
      field = f'{CELL_NAMES[c]} cell node {k + 2} {("x_id", "x_op", "y_id", "y_op")[slot]}'
      if slot in (0, 2) and not 0 <= value < k + 2:
        what = 'itself or a later node' if value >= k + 2 else 'a negative index'
        raise ValueError(f'{self.name}: {field} = {value} reads {what}; '
                         f'allowed inputs are 0..{k + 1}')
      if slot in (1, 3) and not 0 <= value < self.num_ops:
        raise ValueError(f'{self.name}: {field} = {value} is not an op id 0..{self.num_ops - 1}')
    return arch

  def _field_choices(self) -> np.ndarray:
    nodes = np.arange(NODES)[:, None] + 2
    per_node = np.concatenate([nodes, np.full_like(nodes, self.num_ops)] * 2, axis=1)
    return np.tile(per_node[None], (2, 1, 1)).reshape(-1)

  # -- tokens ---------------------------------------------------------------------------------

  def to_tokens(self, archs: np.ndarray) -> np.ndarray:
    archs = np.asarray(archs, np.int32)
    branches = archs.reshape(archs.shape[:-3] + (2 * NODES * 2, 2))  # [..., 20, (id, op)]
    ids, ops = branches[..., 0] + 1, branches[..., 1]
    if self.tokens_per_branch == 2:
      tokens = np.stack([ids, ops + 1 + self.num_inputs], axis=-1)
    else:
      tokens = np.concatenate([ids[..., None], NAO_OP_TOKENS[ops]], axis=-1)
    return tokens.reshape(archs.shape[:-3] + (self.seq_len,)).astype(np.int32)

  def _tokens_to_arch(self, tokens: np.ndarray) -> np.ndarray:
    branches = tokens.reshape(2 * NODES * 2, self.tokens_per_branch)
    ids = branches[:, 0] - 1
    if self.tokens_per_branch == 2:
      ops = branches[:, 1] - 1 - self.num_inputs
    else:
      lookup = {tuple(pair): i for i, pair in enumerate(NAO_OP_TOKENS.tolist())}
      ops = np.array([lookup[tuple(b)] for b in branches[:, 1:].tolist()])
    return np.stack([ids, ops], -1).reshape(self.arch_shape).astype(np.int32)

  def _build_mask_table(self) -> np.ndarray:
    table = np.zeros((self.seq_len, self.vocab_size, self.vocab_size), bool)
    b = self.tokens_per_branch
    for t in range(self.seq_len):
      node = ((t // b) % (2 * NODES)) // 2
      slot = t % b
      if slot == 0:  # input index of a branch: states 0..node+1 (tokens 1..node+2)
        table[t, :, 1:node + 3] = True
      elif b == 2:  # op id
        table[t, :, 1 + self.num_inputs:] = True
      elif slot == 1:  # op type of the 11-op space
        table[t, :, np.unique(NAO_OP_TOKENS[:, 0])] = True
      else:  # op size: only sizes that form one of the 11 ops with the previous type token
        for type_token, size_token in NAO_OP_TOKENS.tolist():
          table[t, type_token, size_token] = True
    return table

  def decoder_mask_table(self) -> np.ndarray:
    return self._mask_table

  def _build_swaps(self) -> np.ndarray:
    b = self.tokens_per_branch
    node_len = 2 * b
    perms = []
    for normal_node, reduction_node in itertools.product(range(NODES), range(NODES)):
      perm = np.arange(self.seq_len)
      for cell, node in ((0, normal_node), (1, reduction_node)):
        start = (cell * NODES + node) * node_len
        first = np.arange(start, start + b)
        perm[first], perm[first + b] = first + b, first
      perms.append(perm)
    return np.asarray(perms, np.int32)

  def swap_permutations(self) -> np.ndarray:
    return self._swaps

  # -- keys and strings -----------------------------------------------------------------------

  def canonical_key(self, arch) -> Hashable:
    branches = np.asarray(arch, np.int32).reshape(2, NODES, 2, 2)
    ordered = np.sort(branches[..., 0] * 100 + branches[..., 1], axis=-1)
    return ordered.astype(np.int32).tobytes()

  def to_string(self, arch) -> str:
    arch = self.validate(arch)
    cells = []
    for c in range(2):
      nodes = [f'n{k + 2} = {self.ops[x_op]}({_state(x)}) + {self.ops[y_op]}({_state(y)})'
               for k, (x, x_op, y, y_op) in enumerate(arch[c].tolist())]
      out = ', '.join(_state(i) for i in loose_ends(arch[c]))
      cells.append(f'{CELL_NAMES[c]}: ' + '; '.join(nodes) + f'; out = concat({out})')
    return '\n'.join(cells)

  def parse(self, text: str) -> np.ndarray:
    values = parse_int_string(text, 2 * NODES * 4, self.name).reshape(self.arch_shape)
    ops = values[..., [1, 3]]
    lo, hi = self.official_op_offset, self.official_op_offset + self.num_ops - 1
    if ops.min() < lo or ops.max() > hi:
      bad = int(ops[(ops < lo) | (ops > hi)][0])
      raise ValueError(f'{self.name}: op id {bad} in {text!r} is outside the official range '
                       f'{lo}..{hi}')
    values[..., [1, 3]] -= self.official_op_offset
    return self.validate(values)

  def format(self, arch) -> str:
    arch = self.validate(arch).copy()
    arch[..., [1, 3]] += self.official_op_offset
    return ' '.join(str(v) for v in arch.reshape(-1).tolist())


def _state(index: int) -> str:
  return f'h{index}' if index < 2 else f'n{index}'


WS_SPACE = CnnSpace('cnn_ws', WS_OPS, tokens_per_branch=2)
NAO_SPACE = CnnSpace('cnn_nao', NAO_OPS, tokens_per_branch=3,
                     official_op_offset=PT_V1_NAO_OP_OFFSET)
