"""Checkpoints of a run directory: Orbax for array trees, JSON for the rest.

One ``RunCheckpointer`` per run directory keeps the newest ``max_to_keep`` steps under
``<workdir>/checkpoints``. Orbax writes each step to a temporary directory and renames it when
complete, so a kill during a save leaves the previous checkpoint intact and no half-written one
is ever restored.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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
