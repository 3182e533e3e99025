"""Checkpoints of a run directory: Orbax for array trees, JSON for the rest.

One ``RunCheckpointer`` per run directory keeps the newest ``max_to_keep`` steps under
``<workdir>/checkpoints``. Orbax writes each step to a temporary directory and renames it when
complete, so a kill during a save leaves the previous checkpoint intact and no half-written one
is ever restored.

Orbax checkpoints are collective in a multi-process run: every process calls save and restore.
Work that one process does alone (a candidate of the scratch evaluator, trained by one process
while the others train other candidates) uses a ``LocalCheckpointer`` instead: the same
interface, plain files (``step_<n>/state.npz`` and ``meta.json``) that this process writes and
reads by itself. (Orbax 0.12 writes numpy arrays from process 0 only and refuses arrays that live
on one process's devices when there are several processes.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def write_json_atomic(path: str, value) -> None:
  """Writes JSON to ``path`` via a temporary file and rename: readers never see half a file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class RunCheckpointer:
  """Saves and restores ``(state pytree, metadata dict)`` pairs by integer step."""

  def __init__(self, workdir: str, max_to_keep: int = 2, subdir: str = 'checkpoints'):
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of the checkpoints on disk, ascending."""
    return sorted(self._manager.all_steps())

  def delete(self, step: int) -> None:
    """Removes the checkpoint of ``step`` (e.g. newer ones after a rollback to an older one)."""
    self._manager.delete(step)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (arrays; typed PRNG keys are stored as key data) and JSON ``meta``."""
    state = jax.tree.map(_to_savable, state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta))), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, template: Any) -> tuple[Any, dict]:
    """Restores the state into the structure of ``template`` and returns ``(state, meta)``."""
    abstract = jax.tree.map(_to_savable, template)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state = jax.tree.map(_from_saved, template, restored['state'])
    return state, restored['meta']

  def restore_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored['meta']

  def close(self) -> None:
    self._manager.close()


class LocalCheckpointer:
  """``RunCheckpointer``'s interface for steps that this process alone saves and restores.

  Layout: ``<workdir>/<subdir>/step_<n>/`` holding ``state.npz`` (one array per leaf, named by
  its tree path; typed PRNG keys as key data) and ``meta.json``. A step is written to
  ``step_<n>.tmp`` and renamed when complete, so a kill never leaves a half-written step to
  restore; the newest ``max_to_keep`` steps are kept. No collective: in a multi-process run the
  other processes never wait for it (they may be busy with their own work).
  """

  def __init__(self, workdir: str, max_to_keep: int = 2, subdir: str = 'checkpoints'):
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep = {max_to_keep}; expected at least 1')
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    self._max_to_keep = max_to_keep
    os.makedirs(self.directory, exist_ok=True)
    for name in os.listdir(self.directory):  # a save killed halfway
      if name.endswith('.tmp'):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, f'step_{step}')

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """The steps on disk, ascending."""
    return sorted(int(name[len('step_'):]) for name in os.listdir(self.directory)
                  if re.fullmatch(r'step_\d+', name))

  def delete(self, step: int) -> None:
    shutil.rmtree(self._path(step))

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` (arrays; typed PRNG keys as key data) and JSON ``meta`` as ``step``."""
    arrays = {jax.tree_util.keystr(path): _to_savable(x)
              for path, x in jax.tree_util.tree_leaves_with_path(state)}
    final, tmp = self._path(step), self._path(step) + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, 'state.npz'), 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump(_jsonable(meta), f, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    if os.path.exists(final):  # saved again (a replayed step): the new one wins, as in Orbax
      shutil.rmtree(final)
    os.replace(tmp, final)
    for old in self.all_steps()[:-self._max_to_keep]:
      self.delete(old)

  def restore(self, step: int, template: Any) -> tuple[Any, dict]:
    """Restores the state into the structure of ``template`` and returns ``(state, meta)``.

    Leaves of ``template`` that are ``jax.ShapeDtypeStruct`` with a sharding are placed there;
    concrete keys come back as typed keys, numpy arrays as numpy arrays.
    """
    with np.load(os.path.join(self._path(step), 'state.npz')) as data:
      def load(path, leaf):
        value = data[jax.tree_util.keystr(path)]
        dtype = getattr(leaf, 'dtype', None)
        if dtype is not None and value.dtype.kind == 'V' and not _is_key(leaf):
          value = value.view(dtype)  # numpy stores extension types (bfloat16) as raw bytes
        if isinstance(leaf, jax.ShapeDtypeStruct):
          value = np.asarray(value, leaf.dtype)
          return value if leaf.sharding is None else jax.device_put(value, leaf.sharding)
        return _from_saved(leaf, value)

      state = jax.tree_util.tree_map_with_path(load, template)
    return state, self.restore_meta(step)

  def restore_meta(self, step: int) -> dict:
    with open(os.path.join(self._path(step), 'meta.json'), encoding='utf-8') as f:
      return json.load(f)

  def close(self) -> None:
    """Nothing to release (the interface of ``RunCheckpointer``)."""


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(x):
  if _is_key(x):
    return np.asarray(jax.random.key_data(x))
  return np.asarray(x) if isinstance(x, (np.ndarray, jax.Array, np.generic)) else x


def _from_saved(template, value):
  if _is_key(template):
    return jax.random.wrap_key_data(np.asarray(value), impl=jax.random.key_impl(template))
  if isinstance(template, np.ndarray):
    return np.asarray(value, dtype=template.dtype)
  return value


def _jsonable(meta: dict) -> dict:
  """Round-trips ``meta`` through JSON (numpy scalars to Python) so what is saved is what loads."""
  return json.loads(json.dumps(meta, default=_json_default))


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'cannot store {type(value).__name__} in checkpoint metadata')
