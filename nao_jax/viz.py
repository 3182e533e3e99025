"""Drawings of NAO cells in the style of the NASNet, DARTS and NAO paper figures.

An architecture becomes one ``CellGraph`` per cell (``cell_graphs``): a small DAG of states whose
edges carry the op (CNN, NB201) or activation (RNN) that transforms one state into another.

* CNN (spec §2.1): inputs h_{i-2} and h_{i-1}; node n_j is the sum (``add``) of its two op-labelled
  edges; the output h_i concatenates the loose ends, inputs included.
* RNN (spec §2.4): x_t and h_{t-1} feed s_0; s_{i+1} reads its predecessor through the labelled
  activation; the output h_t averages s_1..s_11.
* NB201: nodes 0..3, six op-labelled edges; ``none`` (a zero op) is drawn dashed.

``draw_arch`` renders each graph with the graphviz ``dot`` binary when it is on ``PATH`` and
otherwise with a self-contained matplotlib renderer: layers by longest path from the inputs,
edges that skip layers routed through waypoints, barycentre ordering inside a layer, and edge
labels put where they cover no node, no other label and as little of other edges as possible.
Both write PNG and SVG (also PDF, or the DOT source); the matplotlib output is byte-identical
across runs.

Example::

  from nao_jax import spaces, viz
  space, arch = spaces.get_builtin('NAONet-A')
  viz.draw_arch(space, arch, '/tmp/cells', name='NAONet-A')
  # ['/tmp/cells/NAONet-A_normal.png', '/tmp/cells/NAONet-A_normal.svg',
  #  '/tmp/cells/NAONet-A_reduction.png', '/tmp/cells/NAONet-A_reduction.svg']
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import os
import shutil
import subprocess
from typing import Sequence

import numpy as np

from nao_jax.spaces.base import SearchSpace
from nao_jax.spaces.cnn import CELL_NAMES, CnnSpace, loose_ends
from nao_jax.spaces.nb201 import EDGES as NB201_EDGES
from nao_jax.spaces.nb201 import Nb201Space
from nao_jax.spaces.rnn import RnnSpace

FORMATS = ('png', 'svg', 'pdf', 'dot')
RENDERERS = ('auto', 'graphviz', 'matplotlib')

# Node colours of the DARTS figures (graphviz darkseagreen2, lightblue, palegoldenrod).
_FILL = {'input': '#b4eeb4', 'node': '#add8e6', 'output': '#eee8aa'}
_FONT = 'DejaVu Sans'
_DOT_TIMEOUT_S = 60


# -- cells as graphs ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Node:
  """One state of a cell.

  Attributes:
    key: identifier, unique within its graph (``'h0'``, ``'n2'``, ``'s3'``, ``'out'``).
    kind: ``'input'``, ``'node'`` or ``'output'``; sets the colour and pins inputs to the first
      and the output to the last layer.
    name: base symbol (``'h'``, ``'n'``, ``'s'``, ``'x'`` or a digit).
    sub: subscript, ``''`` for none.
    note: plain text after the symbol (``'add'``, ``'concat'``, ``'avg'``).
  """
  key: str
  kind: str
  name: str
  sub: str = ''
  note: str = ''

  def runs(self) -> list[tuple[str, bool]]:
    """The label for matplotlib as ``(text, is_subscript)`` runs, left to right.

    Subscripts are drawn as smaller, lowered plain text rather than mathtext: matplotlib parses
    mathtext slowly and writes it into SVG glyph by glyph, which is neither searchable nor fast.
    """
    runs = [(self.name, False)] + ([(self.sub, True)] if self.sub else [])
    return runs + ([(f' {self.note}', False)] if self.note else [])

  def dot_html(self) -> str:
    """The label as a graphviz HTML-like label body (subscripts as ``<sub>``)."""
    text = html.escape(self.name)
    if self.sub:
      text += f'<sub>{html.escape(self.sub)}</sub>'
    return f'{text} {html.escape(self.note)}' if self.note else text


@dataclasses.dataclass(frozen=True)
class Edge:
  """A data flow ``src -> dst`` labelled with its op or activation (``''`` for none)."""
  src: str
  dst: str
  label: str = ''
  dashed: bool = False


@dataclasses.dataclass(frozen=True)
class CellGraph:
  """One cell as a DAG; ``nodes`` are in topological order.

  Attributes:
    cell: file-name suffix (``'normal'``, ``'reduction'``, ``'recurrent'``, ``'cell'``).
    title: caption under the drawing.
    nodes: the states, inputs first and the output last.
    edges: the labelled data flows.
  """
  cell: str
  title: str
  nodes: tuple[Node, ...]
  edges: tuple[Edge, ...]


def cell_graphs(space: SearchSpace, arch, name: str = 'arch') -> list[CellGraph]:
  """Returns the cells of ``arch`` as graphs, in file order.

  Args:
    space: a CNN, RNN or NB201 space.
    arch: an architecture of ``space`` (``int[2, 5, 4]``, ``int[11, 2]`` or ``int[6]``) or its
      official string.
    name: architecture name used in the captions.

  Raises:
    ValueError: for an invalid architecture or an unsupported space.
  """
  arch = space.parse(arch) if isinstance(arch, str) else space.validate(arch)
  if isinstance(space, CnnSpace):
    return [_cnn_graph(space, arch[c], CELL_NAMES[c], f'{name}: {CELL_NAMES[c]} cell')
            for c in range(2)]
  if isinstance(space, RnnSpace):
    return [_rnn_graph(space, arch, f'{name}: recurrent cell ({space.activation_mapping} '
                                    f'activation ids)')]
  if isinstance(space, Nb201Space):
    return [_nb201_graph(space, arch, f'{name}: NB201 cell')]
  raise ValueError(f'cannot draw architectures of space {space!r}')


def _cnn_key(state: int) -> str:
  return f'h{state}' if state < 2 else f'n{state}'


def _cnn_graph(space: CnnSpace, cell: np.ndarray, cell_name: str, title: str) -> CellGraph:
  nodes = [Node('h0', 'input', 'h', 'i-2'), Node('h1', 'input', 'h', 'i-1')]
  edges = []
  for k, (x, x_op, y, y_op) in enumerate(cell.tolist()):
    key = f'n{k + 2}'
    nodes.append(Node(key, 'node', 'n', str(k + 2), 'add'))
    edges += [Edge(_cnn_key(x), key, space.ops[x_op]), Edge(_cnn_key(y), key, space.ops[y_op])]
  nodes.append(Node('out', 'output', 'h', 'i', 'concat'))
  edges += [Edge(_cnn_key(state), 'out') for state in loose_ends(cell)]
  return CellGraph(cell_name, title, tuple(nodes), tuple(edges))


def _rnn_graph(space: RnnSpace, arch: np.ndarray, title: str) -> CellGraph:
  nodes = [Node('x', 'input', 'x', 't'), Node('h', 'input', 'h', 't-1'),
           Node('s0', 'node', 's', '0')]
  edges = [Edge('x', 's0'), Edge('h', 's0')]
  for i, (pred, act) in enumerate(arch.tolist()):
    nodes.append(Node(f's{i + 1}', 'node', 's', str(i + 1)))
    edges.append(Edge(f's{pred}', f's{i + 1}', space.activations[act]))
  nodes.append(Node('out', 'output', 'h', 't', 'avg'))
  edges += [Edge(f's{i + 1}', 'out') for i in range(len(arch))]  # final models: s0 excluded
  return CellGraph('recurrent', title, tuple(nodes), tuple(edges))


def _nb201_graph(space: Nb201Space, arch: np.ndarray, title: str) -> CellGraph:
  kinds = ('input', 'node', 'node', 'output')
  nodes = [Node(f'v{j}', kind, str(j)) for j, kind in enumerate(kinds)]
  edges = [Edge(f'v{i}', f'v{j}', space.ops[op], dashed=space.ops[op] == 'none')
           for (i, j), op in zip(NB201_EDGES, arch.tolist())]
  return CellGraph('cell', title, tuple(nodes), tuple(edges))


# -- drawing --------------------------------------------------------------------------------------

def draw_arch(space: SearchSpace, arch, out_dir: str, name: str = 'arch',
              formats: Sequence[str] = ('png', 'svg'), renderer: str = 'auto',
              dpi: int = 150) -> list[str]:
  """Draws every cell of ``arch`` into ``out_dir``; one file per cell and format.

  Files are ``<name>_normal.<fmt>`` and ``<name>_reduction.<fmt>`` (CNN), ``<name>_recurrent.<fmt>``
  (RNN) or ``<name>_cell.<fmt>`` (NB201).

  Args:
    space: the architecture's search space.
    arch: the architecture (see ``cell_graphs``), array or official string.
    out_dir: directory, created if missing.
    name: file-name prefix and caption.
    formats: any of ``'png'``, ``'svg'``, ``'pdf'`` and ``'dot'`` (the graphviz source, written by
      both renderers).
    renderer: ``'graphviz'`` (the ``dot`` binary), ``'matplotlib'``, or ``'auto'``: graphviz when
      ``dot`` is on ``PATH``, else matplotlib.
    dpi: resolution of the PNGs.

  Returns:
    The written paths, cell by cell in the order of ``formats``.

  Raises:
    ValueError: bad architecture, name, format or renderer.
    RuntimeError: ``renderer='graphviz'`` without a ``dot`` binary, or ``dot`` failing.
  """
  formats = tuple(formats)
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ValueError(f'formats must be a non-empty subset of {FORMATS}, got {formats}')
  if renderer not in RENDERERS:
    raise ValueError(f'renderer must be one of {RENDERERS}, got {renderer!r}')
  if not name or os.sep in name or (os.altsep and os.altsep in name):
    raise ValueError(f'name must be a non-empty file-name prefix without a path, got {name!r}')
  dot = shutil.which('dot')
  if renderer == 'graphviz' and dot is None:
    raise RuntimeError("renderer='graphviz' needs the graphviz `dot` binary on PATH "
                       "(apt-get install graphviz), or use renderer='matplotlib'")
  use_dot = dot is not None and renderer != 'matplotlib'
  graphs = cell_graphs(space, arch, name)
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for graph in graphs:
    targets = [(fmt, os.path.join(out_dir, f'{name}_{graph.cell}.{fmt}')) for fmt in formats]
    pictures = [(fmt, path) for fmt, path in targets if fmt != 'dot']
    source = to_dot(graph)
    for fmt, path in targets:
      if fmt == 'dot':
        with open(path, 'w', encoding='utf-8') as f:
          f.write(source)
      elif use_dot:
        _run_dot(dot, source, fmt, path, dpi)
    if pictures and not use_dot:
      _render_matplotlib(graph, pictures, dpi)
    paths += [path for _, path in targets]
  return paths


# -- graphviz -------------------------------------------------------------------------------------

def _dot_quote(text: str) -> str:
  return '"' + text.replace('\\', '\\\\').replace('"', '\\"') + '"'


def to_dot(graph: CellGraph) -> str:
  """The graphviz source of one cell (left to right, inputs first, output last)."""
  lines = [
      'digraph cell {',
      f'  graph [rankdir=LR, label={_dot_quote(graph.title)}, labelloc=b, fontname="{_FONT}", '
      'fontsize=12, nodesep=0.25, ranksep=0.5];',
      f'  node [shape=box, style="rounded,filled", fontname="{_FONT}", fontsize=14, height=0.4, '
      'penwidth=1.2];',
      f'  edge [fontname="{_FONT}", fontsize=11, arrowsize=0.7];',
  ]
  inputs = ' '.join(n.key for n in graph.nodes if n.kind == 'input')
  outputs = ' '.join(n.key for n in graph.nodes if n.kind == 'output')
  lines += [f'  {{rank=source; {inputs};}}', f'  {{rank=sink; {outputs};}}']
  for node in graph.nodes:
    lines.append(f'  {node.key} [label=<{node.dot_html()}>, fillcolor="{_FILL[node.kind]}"];')
  for edge in graph.edges:
    attrs = [f'label={_dot_quote(edge.label)}'] if edge.label else ['color=gray40']
    if edge.dashed:
      attrs += ['style=dashed', 'color=gray50', 'fontcolor=gray40']
    lines.append(f'  {edge.src} -> {edge.dst} [{", ".join(attrs)}];')
  lines.append('}')
  return '\n'.join(lines) + '\n'


def _run_dot(dot: str, source: str, fmt: str, path: str, dpi: int) -> None:
  # dpi only for bitmaps: graphviz also rescales SVG coordinates when it is set.
  command = [dot, f'-T{fmt}'] + ([f'-Gdpi={dpi}'] if fmt == 'png' else []) + ['-o', path]
  result = subprocess.run(command, input=source.encode('utf-8'), capture_output=True,
                          timeout=_DOT_TIMEOUT_S, check=False)
  if result.returncode != 0:
    message = result.stderr.decode('utf-8', 'replace').strip().splitlines() or ['no message']
    raise RuntimeError(f'dot -T{fmt} failed for {path}: {message[0]}')


# -- matplotlib: layout ---------------------------------------------------------------------------
#
# A small Sugiyama layout: layers by longest path, edges that skip layers routed through one
# invisible waypoint per skipped layer, barycentre ordering, then vertical positions that pull
# every item towards its neighbours (so long edges run straight) while keeping boxes apart.
# All sizes are in points: the axes map one data unit to one point.

_NODE_FONT, _LABEL_FONT, _TITLE_FONT = 12.0, 9.0, 10.0
_SUB_SCALE = 0.72  # subscript size relative to the node font
_NODE_H, _NODE_PAD, _MARGIN = 24.0, 14.0, 14.0
_NODE_SEP, _WAYPOINT_SEP = 52.0, 16.0  # centre distances inside a layer
_PARALLEL_GAP = 22.0  # distance between the middles of edges joining the same two nodes
_Point = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class _Box:
  """An axis-aligned rectangle in points: centre and size."""
  x: float
  y: float
  w: float
  h: float

  def overlap(self, other: _Box) -> float:
    """Area of the intersection with ``other``."""
    dx = min(self.x + self.w / 2, other.x + other.w / 2) - max(self.x - self.w / 2,
                                                               other.x - other.w / 2)
    dy = min(self.y + self.h / 2, other.y + other.h / 2) - max(self.y - self.h / 2,
                                                               other.y - other.h / 2)
    return max(dx, 0.0) * max(dy, 0.0)

  def contains(self, point: _Point) -> bool:
    return abs(point[0] - self.x) * 2 <= self.w and abs(point[1] - self.y) * 2 <= self.h

  def grown(self, by: float) -> _Box:
    return _Box(self.x, self.y, self.w + by, self.h + by)


@dataclasses.dataclass(frozen=True)
class _Ordering:
  """Layers of node keys and waypoint keys (``'~<edge>.<layer>'``), top to bottom.

  Attributes:
    layers: keys per layer.
    chains: per edge, its source, waypoints and target.
    preds: keys one layer to the left joined to each key, one entry per edge.
    succs: the same to the right.
  """
  layers: list[list[str]]
  chains: list[list[str]]
  preds: dict[str, list[str]]
  succs: dict[str, list[str]]


def _node_layers(graph: CellGraph) -> dict[str, int]:
  """Longest path from the inputs; the output alone in the last layer."""
  index = {node.key: i for i, node in enumerate(graph.nodes)}
  for edge in graph.edges:
    if index[edge.src] >= index[edge.dst]:
      raise ValueError(f'edge {edge.src} -> {edge.dst} is not in topological node order')
  layer = {node.key: 0 for node in graph.nodes}
  for edge in sorted(graph.edges, key=lambda e: index[e.dst]):
    layer[edge.dst] = max(layer[edge.dst], layer[edge.src] + 1)
  last = max(layer[n.key] for n in graph.nodes if n.kind != 'output') + 1
  layer.update({n.key: last for n in graph.nodes if n.kind == 'output'})
  return layer


def _order(graph: CellGraph, sweeps: int = 4) -> _Ordering:
  """Layers with waypoints, ordered by barycentre sweeps (ties keep insertion order)."""
  layer = _node_layers(graph)
  layers = [[] for _ in range(max(layer.values()) + 1)]
  for node in graph.nodes:
    layers[layer[node.key]].append(node.key)
  chains, preds, succs = [], {}, {}
  for i, edge in enumerate(graph.edges):
    skipped = range(layer[edge.src] + 1, layer[edge.dst])
    chain = [edge.src] + [f'~{i}.{l}' for l in skipped] + [edge.dst]
    for l, key in zip(skipped, chain[1:-1]):
      layers[l].append(key)
    for u, v in zip(chain, chain[1:]):
      succs.setdefault(u, []).append(v)
      preds.setdefault(v, []).append(u)
    chains.append(chain)
  layers = [keys for keys in layers if keys]
  tie = {key: i for keys in layers for i, key in enumerate(keys)}
  for sweep in range(sweeps):
    forward = sweep % 2 == 0
    neighbours = preds if forward else succs
    # The inputs keep their order (h_{i-2} above h_{i-1}, as in the DARTS figures).
    for l in (range(1, len(layers)) if forward else range(len(layers) - 2, 0, -1)):
      rank = {key: i for keys in layers for i, key in enumerate(keys)}

      def barycentre(key, rank=rank, neighbours=neighbours):
        around = neighbours.get(key, [])
        return sum(rank[k] for k in around) / len(around) if around else rank[key]

      layers[l] = sorted(layers[l], key=lambda k: (barycentre(k), tie[k]))
  return _Ordering(layers, chains, preds, succs)


def layered_layout(graph: CellGraph) -> list[list[str]]:
  """Orders the nodes of ``graph`` into layers for a left-to-right drawing.

  A node's layer is its longest path from the inputs (inputs first, the output alone last);
  inside a layer, nodes (and waypoints of edges that skip layers) are ordered by the barycentre
  of their neighbours, sweeping forwards and backwards. Ties keep the node order, so the layout
  is deterministic.

  Returns:
    The layers, each a list of node keys from top to bottom.

  Raises:
    ValueError: if an edge does not go from an earlier to a later node.
  """
  return [[k for k in keys if not k.startswith('~')] for keys in _order(graph).layers]


def _isotonic_place(desired: list[float], seps: list[float]) -> list[float]:
  """Heights closest (least squares) to ``desired`` with ``y[i] - y[i + 1] >= seps[i]``.

  With ``z[i] = y[i] + offset[i]`` the constraints say ``z`` does not increase, so this is
  isotonic regression, solved by pooling adjacent violators.
  """
  offsets = [0.0]
  for sep in seps:
    offsets.append(offsets[-1] + sep)
  blocks = []  # [sum, count] of pooled targets
  for want, offset in zip(desired, offsets):
    blocks.append([want + offset, 1])
    while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
      total, count = blocks.pop()
      blocks[-1][0] += total
      blocks[-1][1] += count
  z = [total / count for total, count in blocks for _ in range(count)]
  return [zi - offset for zi, offset in zip(z, offsets)]


def _heights(ordering: _Ordering, iterations: int = 8) -> dict[str, float]:
  """Vertical centres: each layer moves towards its neighbours' mean, alternating directions."""

  def sep(a: str, b: str) -> float:
    waypoints = a.startswith('~') + b.startswith('~')
    return (_NODE_SEP, (_NODE_SEP + _WAYPOINT_SEP) / 2, _WAYPOINT_SEP)[waypoints]

  y = {}
  for keys in ordering.layers:
    seps = [sep(a, b) for a, b in zip(keys, keys[1:])]
    top = sum(seps) / 2
    y.update(zip(keys, [top - sum(seps[:i]) for i in range(len(keys))]))
  n = len(ordering.layers)
  for it in range(iterations):
    forward = it % 2 == 0
    neighbours = ordering.preds if forward else ordering.succs
    for l in (range(1, n) if forward else range(n - 2, -1, -1)):
      keys = ordering.layers[l]
      desired = [sum(y[k] for k in neighbours[key]) / len(neighbours[key])
                 if neighbours.get(key) else y[key] for key in keys]
      y.update(zip(keys, _isotonic_place(desired, [sep(a, b) for a, b in zip(keys, keys[1:])])))
  # Inputs feed most nodes of the next layer: spread them over its height (as the DARTS figures
  # do) so that their fans of edges cross at wide angles rather than in one crowded band.
  inputs, after = ordering.layers[0], [k for k in ordering.layers[1] if not k.startswith('~')]
  if len(inputs) > 1 and len(after) > 1:
    top, bottom = max(y[k] for k in after), min(y[k] for k in after)
    if top - bottom > _NODE_SEP * (len(inputs) - 1):
      step = (top - bottom) / (len(inputs) - 1)
      y.update({key: top - i * step for i, key in enumerate(inputs)})
  return y


@functools.lru_cache(maxsize=512)
def _text_size(text: str, size: float) -> tuple[float, float]:
  """Width and height in points of plain ``text`` in the drawing font."""
  # pylint: disable=import-outside-toplevel
  from matplotlib.font_manager import FontProperties
  from matplotlib.textpath import text_to_path
  prop = FontProperties(family=_FONT, size=size)
  width, height, _ = text_to_path.get_text_width_height_descent(text, prop, ismath=False)
  return float(width), float(max(height, size))


def _run_size(is_sub: bool) -> float:
  return _NODE_FONT * (_SUB_SCALE if is_sub else 1.0)


def _runs_width(node: Node) -> float:
  return sum(_text_size(text, _run_size(is_sub))[0] for text, is_sub in node.runs())


def _positions(graph: CellGraph, ordering: _Ordering) -> dict[str, _Box]:
  """Boxes of nodes and (zero-sized) waypoints; layers are spaced to fit an edge label."""
  nodes = {n.key: n for n in graph.nodes}
  widths = {k: _runs_width(nodes[k]) + _NODE_PAD for k in nodes}
  label_w = max([_text_size(e.label, _LABEL_FONT)[0] for e in graph.edges if e.label] + [0.0])
  gap = 1.4 * label_w + 40.0  # room to slide a label off a crossing
  y = _heights(ordering)
  boxes, x = {}, 0.0
  for l, keys in enumerate(ordering.layers):
    layer_w = max(widths.get(k, 0.0) for k in keys)
    if l:
      x += gap + layer_w / 2
    for key in keys:
      boxes[key] = _Box(x, y[key], widths.get(key, 0.0), _NODE_H if key in nodes else 0.0)
    x += layer_w / 2
  return boxes


# A route is a chain of cubic Bezier pieces (start, control, control, end).
_Piece = tuple[_Point, _Point, _Point, _Point]


def _blossom(piece: _Piece, *us: float) -> _Point:
  """The cubic's blossom ``f(u1, u2, u3)``: ``f(t, t, t)`` is the point at ``t`` and
  ``f(a, a, a), f(a, a, b), f(a, b, b), f(b, b, b)`` the piece between ``a`` and ``b``."""
  points = list(piece)
  for u in us:  # de Casteljau, one parameter per level
    points = [((1 - u) * p[0] + u * q[0], (1 - u) * p[1] + u * q[1])
              for p, q in zip(points, points[1:])]
  return points[0]


def _at(piece: _Piece, t: float) -> _Point:
  return _blossom(piece, t, t, t)


def _sub_piece(piece: _Piece, a: float, b: float) -> _Piece:
  return (_blossom(piece, a, a, a), _blossom(piece, a, a, b), _blossom(piece, a, b, b),
          _blossom(piece, b, b, b))


def _crossing(piece: _Piece, box: _Box, leaving: bool) -> float:
  """Parameter where ``piece`` leaves (or enters) ``box``, which holds its start (or end)."""
  lo, hi = 0.0, 1.0
  for _ in range(30):
    mid = (lo + hi) / 2
    if box.contains(_at(piece, mid)) == leaving:
      lo = mid
    else:
      hi = mid
  return hi if leaving else lo


def _route(edge_index: int, graph: CellGraph, ordering: _Ordering,
           boxes: dict[str, _Box]) -> list[_Piece]:
  """Pieces of one edge from box border to box border, through its waypoints."""
  edge = graph.edges[edge_index]
  points = [(boxes[k].x, boxes[k].y) for k in ordering.chains[edge_index]]
  if len(points) == 2:
    twins = [i for i, e in enumerate(graph.edges) if (e.src, e.dst) == (edge.src, edge.dst)]
    # Fan out edges between the same two nodes: bow each sideways by a fixed distance (a cubic
    # through these controls bows by 3/4 of the control offset).
    (ax, ay), (bx, by) = points
    length = max(math.hypot(bx - ax, by - ay), 1.0)
    offset = _PARALLEL_GAP / 0.75 * (twins.index(edge_index) - (len(twins) - 1) / 2)
    normal = (-(by - ay) / length * offset, (bx - ax) / length * offset)
    pieces = [(points[0], (ax + (bx - ax) / 3 + normal[0], ay + (by - ay) / 3 + normal[1]),
               (ax + 2 * (bx - ax) / 3 + normal[0], ay + 2 * (by - ay) / 3 + normal[1]),
               points[1])]
  else:
    # Catmull-Rom spline: a smooth curve through every waypoint.
    padded = [points[0]] + points + [points[-1]]
    pieces = []
    for i in range(1, len(padded) - 2):
      p0, p1, p2, p3 = padded[i - 1:i + 3]
      pieces.append((p1, (p1[0] + (p2[0] - p0[0]) / 6, p1[1] + (p2[1] - p0[1]) / 6),
                     (p2[0] - (p3[0] - p1[0]) / 6, p2[1] - (p3[1] - p1[1]) / 6), p2))
  src, dst = boxes[edge.src].grown(2), boxes[edge.dst].grown(2)  # tips stop short of the box
  t0 = _crossing(pieces[0], src, leaving=True)
  if len(pieces) == 1:
    return [_sub_piece(pieces[0], t0, _crossing(pieces[0], dst, leaving=False))]
  t1 = _crossing(pieces[-1], dst, leaving=False)
  return [_sub_piece(pieces[0], t0, 1.0)] + pieces[1:-1] + [_sub_piece(pieces[-1], 0.0, t1)]


def _place_labels(graph: CellGraph, boxes: dict[str, _Box], nodes: list[str],
                  routes: list[list[_Piece]]) -> list[_Box | None]:
  """A box per edge label, centred on its own edge.

  Among points along the edge, the one chosen overlaps no node or earlier label if it can, hides
  as little of other edges as it can (a label on a crossing reads as the other edge's), and lies
  close to the middle of the last gap before the target: a CNN node has two inputs but may feed
  many nodes, so edges are further apart at their targets than at their sources.
  """
  samples = [np.array([_at(piece, t) for piece in route for t in np.linspace(0.025, 0.975, 39)])
             for route in routes]
  taken = [boxes[k] for k in nodes]
  placed = []
  for i, (edge, route) in enumerate(zip(graph.edges, routes)):
    if not edge.label:
      placed.append(None)
      continue
    w, h = _text_size(edge.label, _LABEL_FONT)
    w, h = w + 4, h + 2
    dst = boxes[edge.dst]
    preferred = (route[-1][0][0] + dst.x - dst.w / 2) / 2
    others = np.concatenate([points for j, points in enumerate(samples) if j != i] +
                            [np.zeros((0, 2))])
    centres = samples[i]
    inside = ((np.abs(others[None, :, 0] - centres[:, None, 0]) * 2 <= w) &
              (np.abs(others[None, :, 1] - centres[:, None, 1]) * 2 <= h))
    hidden = inside.sum(axis=1)
    candidates = [_Box(float(x), float(y), w, h) for x, y in centres]
    costs = [10.0 * sum(c.overlap(o) for o in taken) + 20.0 * float(n) + abs(c.x - preferred)
             for c, n in zip(candidates, hidden)]
    best = candidates[int(np.argmin(costs))]  # argmin keeps the first of equals: deterministic
    taken.append(best)
    placed.append(best)
  return placed


# -- matplotlib: rendering ------------------------------------------------------------------------

# Fixed SVG ids and no timestamps, so the same cell always gives the same bytes.
_RC = {'svg.hashsalt': 'nao_jax.viz', 'svg.fonttype': 'none', 'font.family': _FONT,
       'text.usetex': False}
_METADATA = {'png': {'Software': None}, 'svg': {'Date': None},
             'pdf': {'CreationDate': None, 'ModDate': None}}


@dataclasses.dataclass(frozen=True)
class _Drawing:
  """Everything the matplotlib renderer places, in points.

  Attributes:
    boxes: node boxes by key.
    routes: per edge, its visible pieces.
    labels: per edge, the box of its label (``None`` for unlabelled edges).
    extent: ``(x0, x1, y0, y1)`` of the figure, margins and caption included.
  """
  boxes: dict[str, _Box]
  routes: list[list[_Piece]]
  labels: list[_Box | None]
  extent: tuple[float, float, float, float]


def _draw_layout(graph: CellGraph) -> _Drawing:
  """Places nodes, edges and labels of ``graph`` (no matplotlib figure needed)."""
  ordering = _order(graph)
  boxes = _positions(graph, ordering)
  nodes = [n.key for n in graph.nodes]
  routes = [_route(i, graph, ordering, boxes) for i in range(len(graph.edges))]
  labels = _place_labels(graph, boxes, nodes, routes)
  # A cubic lies inside the hull of its four points, so these bound the drawing.
  used = [boxes[k] for k in nodes] + [b for b in labels if b is not None]
  used += [_Box(x, y, 0, 0) for route in routes for piece in route for x, y in piece]
  extent = (min(b.x - b.w / 2 for b in used) - _MARGIN, max(b.x + b.w / 2 for b in used) + _MARGIN,
            min(b.y - b.h / 2 for b in used) - _MARGIN - 2 * _TITLE_FONT,
            max(b.y + b.h / 2 for b in used) + _MARGIN)
  return _Drawing({k: boxes[k] for k in nodes}, routes, labels, extent)


def _render_matplotlib(graph: CellGraph, targets: Sequence[tuple[str, str]], dpi: int) -> None:
  """Draws ``graph`` once and saves it to every ``(format, path)`` of ``targets``."""
  # pylint: disable=import-outside-toplevel
  import matplotlib
  from matplotlib.figure import Figure

  with matplotlib.rc_context(_RC):
    drawing = _draw_layout(graph)
    x0, x1, y0, y1 = drawing.extent
    fig = Figure(figsize=((x1 - x0) / 72, (y1 - y0) / 72))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_axis_off()
    _draw_nodes(ax, graph, drawing)
    _draw_edges(ax, graph, drawing)
    ax.text((x0 + x1) / 2, y0 + _MARGIN / 2 + _TITLE_FONT / 2, graph.title, ha='center',
            va='center', fontsize=_TITLE_FONT, color='0.25')
    for fmt, path in targets:
      fig.savefig(path, format=fmt, dpi=dpi, metadata=_METADATA[fmt])


# add_artist, not add_patch, below: the limits are fixed, and updating them costs time.

def _draw_nodes(ax, graph: CellGraph, drawing: _Drawing) -> None:
  """Rounded boxes coloured by kind, with the symbol and note left to right."""
  from matplotlib.patches import FancyBboxPatch  # pylint: disable=import-outside-toplevel
  for node in graph.nodes:
    box = drawing.boxes[node.key]
    ax.add_artist(FancyBboxPatch(
        (box.x - box.w / 2, box.y - box.h / 2), box.w, box.h,
        boxstyle='round,pad=0,rounding_size=6', fc=_FILL[node.kind], ec='black', lw=1.0,
        zorder=2))
    x = box.x - (box.w - _NODE_PAD) / 2
    baseline = box.y - 0.36 * _NODE_FONT  # centres lower-case letters and digits
    for text, is_sub in node.runs():
      ax.text(x, baseline - (0.25 * _NODE_FONT if is_sub else 0.0), text, ha='left',
              va='baseline', fontsize=_run_size(is_sub), zorder=3)
      x += _text_size(text, _run_size(is_sub))[0]


def _draw_edges(ax, graph: CellGraph, drawing: _Drawing) -> None:
  """Arrows along the routes (grey when unlabelled, dashed for zero ops) and their labels."""
  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import FancyArrowPatch
  from matplotlib.path import Path
  for edge, route, label in zip(graph.edges, drawing.routes, drawing.labels):
    vertices = [route[0][0]] + [p for piece in route for p in piece[1:]]
    codes = [Path.MOVETO] + [Path.CURVE4] * (len(vertices) - 1)
    ax.add_artist(FancyArrowPatch(
        path=Path(vertices, codes), arrowstyle='-|>', mutation_scale=9, lw=0.9,
        color='black' if edge.label else '0.45', linestyle='--' if edge.dashed else '-',
        zorder=1))
    if label is not None:
      ax.text(label.x, label.y, edge.label, ha='center', va='center', fontsize=_LABEL_FONT,
              color='0.3' if edge.dashed else 'black', zorder=4,
              bbox={'boxstyle': 'round,pad=0.1', 'fc': 'white', 'ec': 'none', 'alpha': 0.9})
