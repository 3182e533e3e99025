"""The Colab notebook runs top to bottom on CPU (tiny quickstart variant)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'experiments', 'colab', 'quickstart.ipynb')


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('NAO_QUICKSTART_VARIANT', 'tiny')
  # As conftest.py does for this process: tiny shapes compile faster without XLA's passes.
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  monkeypatch.setenv('PYTHONPATH', ROOT)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  # Run from a scratch directory so the run directory does not land in the repository.
  notebook.cells[1].source = notebook.cells[1].source.replace(
      'sys.path.insert(0, os.getcwd())', f'sys.path.insert(0, {ROOT!r})')
  client.execute()
  outputs = ''.join(o.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                    for o in cell.get('outputs', []))
  assert 'best architecture:' in outputs
  assert os.path.exists(tmp_path / 'runs' / 'quickstart_notebook_tiny' / 'results.json')
