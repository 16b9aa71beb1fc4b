"""Orbax checkpoints of model + optimizer state and the data position (DESIGN.md section 5).

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames). Restore tries
the newest step first; an unreadable one is reported with a warning and the one before it is used.
"""
from __future__ import annotations

import os
import warnings

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_position: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)))

  def restore_latest(self, abstract_state):
    """Returns (step, state, data_position) from the newest readable checkpoint, or None."""
    self.manager.wait_until_finished()
    for step in reversed(self.steps()):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, out["state"], out["data"]
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        warnings.warn(f"checkpoint at step {step} in {self.directory} is unreadable "
                      f"({type(e).__name__}: {str(e)[:200]}); falling back to the previous one")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
