"""The NAS-Bench-201 (NATS-Bench topology) cell space.

A cell has 4 nodes and 6 edges ``(i -> j)``, ``0 <= i < j <= 3``, each carrying one of 5 ops. An
architecture is ``int32[6]`` of op ids in the official edge order of the string
``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` (edges 0->1; 0->2, 1->2; 0->3, 1->3, 2->3).

Tokens: one per edge. With ``edge_tokens=True`` (the default) a token names the (edge, op) pair,
``1 + 5 * edge + op`` (vocabulary 31 with SOS), and the decoder mask allows at each position only
the 5 tokens of that edge; with ``edge_tokens=False`` a token is just ``op + 1`` (vocabulary 6),
and the position must be inferred by the LSTM. Pair tokens give the encoder the edge identity
directly, which makes the predictor far more sample-efficient on this benchmark (see
``benchmarks/README.md``). The encoder reads one edge per step. There is no branch symmetry.
"""

from __future__ import annotations

import re

import numpy as np

from nao_jax.spaces.base import SearchSpace, check_shape

NB201_OPS = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))  # (from, to), official string order
_NODE_RE = re.compile(r'^\|(?:[a-z0-9_]+~\d+\|)+$')


class Nb201Space(SearchSpace):
  """The NAS-Bench-201 space: 5^6 = 15,625 cells."""

  def __init__(self, name: str = 'nb201', edge_tokens: bool = True):
    self.name = name
    self.ops = NB201_OPS
    self.num_ops = len(NB201_OPS)
    self.arch_shape = (len(EDGES),)
    self.seq_len = len(EDGES)
    self.edge_tokens = edge_tokens
    self.vocab_size = 1 + self.num_ops * (len(EDGES) if edge_tokens else 1)
    self.tokens_per_step = 1
    self.official_format = "'|op~0|+|op~0|op~1|+|op~0|op~1|op~2|' with ops " + ', '.join(NB201_OPS)
    table = np.zeros((self.seq_len, self.vocab_size, self.vocab_size), bool)
    for t in range(self.seq_len):
      first = 1 + (self.num_ops * t if edge_tokens else 0)
      table[t, :, first:first + self.num_ops] = True
    self._mask_table = table

  def _offsets(self) -> np.ndarray:
    return 1 + (self.num_ops * np.arange(self.seq_len) if self.edge_tokens else 0)

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, self.num_ops, (n, self.seq_len)).astype(np.int32)

  def validate(self, arch) -> np.ndarray:
    arch = check_shape(arch, self.arch_shape, self.name)
    bad = np.flatnonzero((arch < 0) | (arch >= self.num_ops))
    if bad.size:
      i, j = EDGES[bad[0]]
      raise ValueError(f'nb201: edge {i}->{j} op = {int(arch[bad[0]])} is not an op id '
                       f'0..{self.num_ops - 1}')
    return arch

  def _field_choices(self) -> np.ndarray:
    return np.full(self.seq_len, self.num_ops)

  def to_tokens(self, archs: np.ndarray) -> np.ndarray:
    return (np.asarray(archs, np.int32) + self._offsets()).astype(np.int32)

  def _tokens_to_arch(self, tokens: np.ndarray) -> np.ndarray:
    return (tokens - self._offsets()).astype(np.int32)

  def decoder_mask_table(self) -> np.ndarray:
    return self._mask_table

  def to_string(self, arch) -> str:
    return self.format(arch)

  def parse(self, text: str) -> np.ndarray:
    if not isinstance(text, str):
      raise ValueError(f'nb201: expected an architecture string, got {type(text).__name__}')
    nodes = text.strip().split('+')
    if len(nodes) != 3 or not all(_NODE_RE.match(n) for n in nodes):
      raise ValueError(f"nb201: {text!r} is not of the form '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'")
    arch = []
    for j, node in enumerate(nodes, start=1):
      edges = node.strip('|').split('|')
      if len(edges) != j:
        raise ValueError(f'nb201: node {j} of {text!r} has {len(edges)} edges, expected {j}')
      for i, edge in enumerate(edges):
        op, source = edge.rsplit('~', 1)
        if int(source) != i:
          raise ValueError(f'nb201: edge {edge!r} into node {j} must read node {i}')
        if op not in NB201_OPS:
          raise ValueError(f'nb201: unknown op {op!r} in {text!r}; ops are {", ".join(NB201_OPS)}')
        arch.append(NB201_OPS.index(op))
    return np.asarray(arch, np.int32)

  def format(self, arch) -> str:
    arch = self.validate(arch)
    nodes, position = [], 0
    for j in range(1, 4):
      edges = [f'{self.ops[arch[position + i]]}~{i}' for i in range(j)]
      position += j
      nodes.append('|' + '|'.join(edges) + '|')
    return '+'.join(nodes)


NB201_SPACE = Nb201Space()
NB201_OP_TOKENS_SPACE = Nb201Space('nb201_op_tokens', edge_tokens=False)
