"""Orbax checkpoints of model + optimizer state and the data position (docs/reliability.md).

Saves are asynchronous and atomic (Orbax writes to `<step>.orbax-checkpoint-tmp-*` and renames). A
save that does not happen, or fails (a full or read-only disk), raises CheckpointError and leaves no
partial directory behind. Restore tries the newest step first; an unreadable one is reported with a
warning and the one before it is used. A training run also moves unreadable steps aside (renamed to
`<step>.unreadable-<time>`, never deleted), so it can save that step number again.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings

import jax
import orbax.checkpoint as ocp

TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written; the message says why and what to do."""


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep={keep}: a checkpointer must keep at least one checkpoint")
    self.directory = os.path.abspath(directory)
    with _absl_errors_silenced():  # a damaged step's metadata: restore_latest reports it
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save))
    self.unreadable: list[int] = []  # steps restore_latest could not read
    self.moved_aside: list[str] = []  # where move_aside put them
    self._pending_step: int | None = None  # the step an asynchronous save is writing
    self._failed_save = False

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _step_dirs(self) -> list[int]:
    """Steps with a finished directory on disk (Orbax may not list a damaged one)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  def _failed(self, step: int, err: BaseException) -> CheckpointError:
    self._failed_save = True
    self.remove_partial_saves()
    self.manager.reload()
    have = self.steps()
    resume = f"from step {have[-1]}" if have else "from the start"
    why = f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else (
        f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else ""))
    return CheckpointError(
        f"could not save the checkpoint at step {step} in {self.directory}: {why}; free disk "
        f"space or fix permissions, then rerun the same command to resume {resume}")

  def save(self, step: int, state, data_position: dict) -> None:
    """Starts saving `step`; raises CheckpointError if Orbax declines or an earlier save failed."""
    self.wait()  # surfaces a failure of the previous asynchronous save at this point
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)))
    except Exception as e:  # noqa: BLE001 - any failure to start a save is reported the same way
      raise self._failed(step, e) from e
    if not saved:
      latest = self.manager.latest_step()
      raise CheckpointError(
          f"the checkpoint at step {step} was not saved: {self.directory} already holds step "
          f"{latest}; move that directory aside (or use a new --workdir) and rerun")
    self._pending_step = step

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises CheckpointError if it failed."""
    step, self._pending_step = self._pending_step, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._failed(step if step is not None else -1, e) from e
    if step is not None and step not in self._step_dirs():
      # Orbax logs (and swallows) some finalisation failures: the step must be on disk.
      raise self._failed(step, CheckpointError("no finished directory after the save"))

  def remove_partial_saves(self) -> list[str]:
    """Deletes Orbax's temporary directories (saves that never finished); returns their names."""
    if not os.path.isdir(self.directory):
      return []
    gone = []
    for name in os.listdir(self.directory):
      if TMP_MARK in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        gone.append(name)
    return gone

  def move_aside(self, step: int) -> str:
    """Renames the directory of `step` to `<step>.unreadable-<time>` (kept for inspection)."""
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}"
    n = 1
    while os.path.exists(dst):
      dst = f"{src}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}-{n}"
      n += 1
    os.rename(src, dst)
    self.moved_aside.append(dst)
    return dst

  def restore_latest(self, abstract_state, *, move_aside: bool = False):
    """Returns (step, state, data_position) from the newest readable checkpoint, or None.

    Unreadable steps are listed in `self.unreadable`; with `move_aside` (training) they are also
    renamed out of the way, so the run can save those step numbers again.
    """
    self.wait()
    known = set(self.steps())
    found = None
    for step in sorted(known | set(self._step_dirs()), reverse=True):
      try:
        if step not in known:
          raise CheckpointError("Orbax does not list it (missing or damaged metadata)")
        with _absl_errors_silenced():
          out = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        found = step, out["state"], out["data"]
        break
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        self.unreadable.append(step)
        where = ""
        if move_aside:
          where = f"; moved to {os.path.basename(self.move_aside(step))}"
        warnings.warn(f"checkpoint at step {step} in {self.directory} is unreadable "
                      f"({type(e).__name__}: {str(e)[:200]}){where}; falling back to the "
                      "previous one")
    if move_aside and self.unreadable:
      self.manager.reload()
    return found

  def close(self) -> None:
    """Waits for the last save (raising CheckpointError if it failed) and closes Orbax."""
    try:
      self.wait()
    finally:
      self.manager.close()
      if self._failed_save:
        self._settle_partial_saves()

  def _settle_partial_saves(self, quiet_checks: int = 3, interval_s: float = 0.2,
                            max_checks: int = 50) -> None:
    """After a failed save, the writers of the other items (array data) can run on for a moment
    and recreate the temporary directory: remove it until it stays gone for `quiet_checks`."""
    quiet = 0
    for _ in range(max_checks):
      quiet = 0 if self.remove_partial_saves() else quiet + 1
      if quiet >= quiet_checks:
        return
      time.sleep(interval_s)


@contextlib.contextmanager
def _absl_errors_silenced():
  """Orbax logs each failed read at ERROR; restore_latest reports it in one warning instead."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def abstract_like(state):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
