"""Cell drawings: graph structure, layout, both renderers, determinism, and the launcher."""

import filecmp
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from nao_jax import spaces, viz
from nao_jax.spaces import cnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An NB201 cell with a zero ('none') edge, drawn dashed.
NB201_ARCH = ('|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|'
              '+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|')
CASES = {**{name: spaces.get_builtin(name) for name in spaces.BUILTINS},
         'nb201-example': (spaces.NB201_SPACE, spaces.NB201_SPACE.parse(NB201_ARCH))}
CELLS = {'cnn_ws': ('normal', 'reduction'), 'cnn_nao': ('normal', 'reduction'),
         'rnn_nao': ('recurrent',), 'rnn_ws': ('recurrent',), 'nb201': ('cell',)}


# -- graphs and layout ----------------------------------------------------------------------------

def test_cnn_graph_follows_the_cell():
  space, arch = spaces.get_builtin('NAONet-A')
  normal, reduction = viz.cell_graphs(space, arch, 'NAONet-A')
  assert (normal.cell, reduction.cell) == ('normal', 'reduction')
  assert [n.key for n in normal.nodes] == ['h0', 'h1', 'n2', 'n3', 'n4', 'n5', 'n6', 'out']
  labelled = [(e.src, e.dst, e.label) for e in normal.edges if e.label]
  # spec §8.1: n2 = conv3x3(0) + avgpool5x5(1), ..., n6 = identity(1) + conv3x3(0)
  assert labelled[:2] == [('h0', 'n2', 'conv_3x3'), ('h1', 'n2', 'avg_pool_5x5')]
  assert labelled[-2:] == [('h1', 'n6', 'identity'), ('h0', 'n6', 'conv_3x3')]
  assert len(labelled) == 10
  assert [e.src for e in normal.edges if e.dst == 'out'] == ['n3', 'n5', 'n6']
  for graph, cell in zip((normal, reduction), arch):
    assert [e.src for e in graph.edges if e.dst == 'out'] == [
        f'h{i}' if i < 2 else f'n{i}' for i in cnn.loose_ends(cell)]


def test_rnn_and_nb201_graphs():
  space, arch = spaces.get_builtin('NAONet-WS-PTB')
  (graph,) = viz.cell_graphs(space, arch)
  acts = {(e.src, e.dst): e.label for e in graph.edges if e.label}
  # spec §8.5 (NAO-WS ids): s3 = sigmoid(s2), s10 = tanh(s1)
  assert len(acts) == 11 and acts[('s2', 's3')] == 'sigmoid' and acts[('s1', 's10')] == 'tanh'
  assert [e.src for e in graph.edges if e.dst == 'out'] == [f's{i}' for i in range(1, 12)]
  assert [e.src for e in graph.edges if e.dst == 's0'] == ['x', 'h']
  (cell,) = viz.cell_graphs(spaces.NB201_SPACE, NB201_ARCH)
  assert [(e.src, e.dst, e.label, e.dashed) for e in cell.edges][:3] == [
      ('v0', 'v1', 'nor_conv_3x3', False), ('v0', 'v2', 'none', True),
      ('v1', 'v2', 'avg_pool_3x3', False)]


@pytest.mark.parametrize('name', list(CASES))
def test_layers_are_longest_paths(name):
  for graph in viz.cell_graphs(*CASES[name]):
    layers = viz.layered_layout(graph)
    layer = {key: l for l, keys in enumerate(layers) for key in keys}
    assert sorted(layer) == sorted(n.key for n in graph.nodes)
    assert {n.key for n in graph.nodes if n.kind == 'input'} == set(layers[0])
    assert layers[-1] == [n.key for n in graph.nodes if n.kind == 'output']
    for node in graph.nodes:
      preds = [layer[e.src] for e in graph.edges if e.dst == node.key]
      if node.kind != 'output':
        assert layer[node.key] == (max(preds) + 1 if preds else 0)
      assert all(p < layer[node.key] for p in preds)


def test_naonet_a_normal_layers():
  space, arch = spaces.get_builtin('NAONet-A')
  layers = viz.layered_layout(viz.cell_graphs(space, arch)[0])
  assert [sorted(keys) for keys in layers] == [['h0', 'h1'], ['n2', 'n4', 'n6'], ['n3', 'n5'],
                                               ['out']]


def test_isotonic_place_keeps_separation_and_feasible_targets():
  # pylint: disable=protected-access
  assert viz._isotonic_place([100.0, 0.0, -100.0], [50.0, 50.0]) == [100.0, 0.0, -100.0]
  y = viz._isotonic_place([0.0, 0.0, 0.0], [50.0, 10.0])
  assert y[0] - y[1] == pytest.approx(50.0) and y[1] - y[2] == pytest.approx(10.0)
  assert sum(y) == pytest.approx(0.0)  # least squares: centred on the common target


# -- rendering ------------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=['matplotlib', 'graphviz'])
def drawn(request, tmp_path_factory):
  """``renderer, {case: paths}`` with every case drawn as PNG and SVG."""
  renderer = request.param
  if renderer == 'graphviz' and shutil.which('dot') is None:
    pytest.skip('graphviz `dot` binary not on PATH: graphviz renderer not tested '
                '(apt-get install graphviz to test it)')
  out = tmp_path_factory.mktemp(renderer)
  return renderer, {name: viz.draw_arch(space, arch, str(out), name=name, renderer=renderer)
                    for name, (space, arch) in CASES.items()}


def test_one_file_per_cell_and_format(drawn):
  _, paths = drawn
  for name, (space, _) in CASES.items():
    expected = [f'{name}_{cell}.{fmt}' for cell in CELLS[space.name] for fmt in ('png', 'svg')]
    assert [os.path.basename(p) for p in paths[name]] == expected
    assert all(os.path.getsize(p) > 0 for p in paths[name])


def test_pngs_are_images_of_sensible_size(drawn):
  _, paths = drawn
  for path in (p for ps in paths.values() for p in ps if p.endswith('.png')):
    with Image.open(path) as image:
      image.verify()
    with Image.open(path) as image:
      assert image.format == 'PNG'
      width, height = image.size
      assert 300 <= width <= 6000 and 150 <= height <= 4000, (path, image.size)
      dark, light = image.convert('L').getextrema()
      assert dark < 80 and light > 230, f'{path} looks blank'


def test_svgs_parse_and_show_every_label(drawn):
  _, paths = drawn
  for name, (space, arch) in CASES.items():
    svgs = [p for p in paths[name] if p.endswith('.svg')]
    for graph, path in zip(viz.cell_graphs(space, arch, name), svgs):
      root = ET.parse(path).getroot()
      assert root.tag.endswith('svg')
      text = ' '.join(root.itertext())
      for edge in graph.edges:
        assert edge.label in text, (path, edge.label)
      output = [n.note for n in graph.nodes if n.kind == 'output' and n.note]
      assert all(note in text for note in output), (path, output)
      assert graph.title in text


def test_matplotlib_output_is_deterministic(drawn, tmp_path):
  renderer, paths = drawn
  if renderer != 'matplotlib':
    pytest.skip('byte-identical output is only promised for the matplotlib renderer')
  for name in ('NAONet-A', 'NAONet-PTB'):
    again = viz.draw_arch(*CASES[name], str(tmp_path), name=name, renderer='matplotlib')
    for first, second in zip(paths[name], again):
      assert filecmp.cmp(first, second, shallow=False), first


def test_auto_uses_matplotlib_without_dot(monkeypatch, tmp_path):
  monkeypatch.setattr(viz.shutil, 'which', lambda _: None)
  (svg,) = viz.draw_arch(spaces.NB201_SPACE, NB201_ARCH, str(tmp_path), formats=('svg',))
  with open(svg, encoding='utf-8') as f:
    assert 'Matplotlib' in f.read()
  with pytest.raises(RuntimeError, match='dot'):
    viz.draw_arch(spaces.NB201_SPACE, NB201_ARCH, str(tmp_path), renderer='graphviz')


def test_dot_source_is_written_without_graphviz(monkeypatch, tmp_path):
  monkeypatch.setattr(viz.shutil, 'which', lambda _: None)
  space, arch = spaces.get_builtin('NAONet-B')
  paths = viz.draw_arch(space, arch, str(tmp_path), name='b', formats=('dot',))
  assert [os.path.basename(p) for p in paths] == ['b_normal.dot', 'b_reduction.dot']
  with open(paths[0], encoding='utf-8') as f:
    source = f.read()
  assert source.startswith('digraph') and 'h0 -> n2 [label="sep_conv_5x5"]' in source


@pytest.mark.parametrize('kwargs, match', [
    ({'formats': ('gif',)}, 'formats'),
    ({'formats': ()}, 'formats'),
    ({'renderer': 'tikz'}, 'renderer'),
    ({'name': 'a/b'}, 'name'),
    ({'arch': [0] * 6}, 'shape'),  # an NB201 array given to a CNN space
    ({'arch': '0 1 0 9'}, 'expected 40 integers'),
    ({'space': spaces.NAO_SPACE}, 'op id 1 in'),  # a 5-op string read as 11-op (ids 5..15)
])
def test_bad_arguments_raise(kwargs, match, tmp_path):
  call = {'space': spaces.WS_SPACE, 'arch': spaces.BUILTINS['NAONet-B'].text,
          'out_dir': str(tmp_path / 'out'), **kwargs}
  with pytest.raises(ValueError, match=match):
    viz.draw_arch(**call)
  assert not os.path.exists(tmp_path / 'out')


# -- launcher -------------------------------------------------------------------------------------

def _launch(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.draw_arch', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=False)


def test_launcher_draws_a_builtin(tmp_path):
  result = _launch('NAONet-B', f'--out={tmp_path}')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert [os.path.basename(p) for p in lines] == [
      'NAONet-B_normal.png', 'NAONet-B_normal.svg', 'NAONet-B_reduction.png',
      'NAONet-B_reduction.svg']
  assert all(os.path.isfile(p) for p in lines)


@pytest.mark.parametrize('args, message', [
    (('NAONet-Z',), "unknown built-in architecture 'NAONet-Z'"),
    (('--space=nb201', '--arch=|conv~0|'), 'nb201'),
])
def test_launcher_fails_in_one_line(args, message, tmp_path):
  result = _launch(*args, f'--out={tmp_path}')
  assert result.returncode != 0
  assert result.stderr.strip().count('\n') == 0 and result.stderr.startswith('error: ')
  assert message in result.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('space_name', ['cnn_nao', 'cnn_ws', 'rnn_ws'])
def test_random_architectures_render(space_name, tmp_path):
  space = spaces.get_space(space_name)
  for i, arch in enumerate(space.sample(np.random.default_rng(0), 2)):
    for svg in viz.draw_arch(space, arch, str(tmp_path), name=f'r{i}', formats=('svg',),
                             renderer='matplotlib'):
      assert ET.parse(svg).getroot().tag.endswith('svg')
