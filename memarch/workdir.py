"""What a training workdir holds besides checkpoints and metrics: the lock that gives it to one
process at a time, and the record of a finished run (docs/reliability.md).

The lock is `<workdir>/lock.json`, holding the holder's pid, host and start time. On filesystems
with `flock` the kernel holds the lock, so a killed run (even SIGKILL) frees it at once; where
`flock` is not supported, the file's pid and host decide (a dead pid on this host is a stale lock).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from typing import Any

try:
  import fcntl
except ImportError:  # not POSIX: the pid/host contents alone decide
  fcntl = None

LOCK_FILE = "lock.json"
FINISHED_FILE = "finished.json"


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir."""


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      out = json.load(f)
    return out if isinstance(out, dict) else None
  except (OSError, ValueError):
    return None


class WorkdirLock:
  """Exclusive hold of a workdir for one training process; `with WorkdirLock(d): ...`.

  `acquire` raises WorkdirBusy with one line naming the holder; `release` (also on exceptions, via
  the context manager) removes the file. A lock left by a dead process is taken over.
  """

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.stale_holder: dict | None = None  # the dead holder whose lock was taken over, if any
    self._fd: int | None = None

  def _busy(self, holder: dict | None, *, certain: bool) -> WorkdirBusy:
    h = holder or {}
    who = (f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}"
           if holder else "a process that left no pid")
    fix = "wait for it to finish or use another --workdir"
    if not certain:
      fix += f"; if that run is gone, delete {self.path}"
    return WorkdirBusy(f"workdir {self.workdir} is in use by another run ({who}); {fix}")

  def acquire(self) -> "WorkdirLock":
    os.makedirs(self.workdir, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
          "argv": list(sys.argv)}
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      kernel_lock = fcntl is not None
      if kernel_lock:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          os.close(fd)
          raise self._busy(_read_json(self.path), certain=True) from None
        except OSError as e:  # e.g. ENOLCK / EOPNOTSUPP on some network filesystems
          if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
          kernel_lock = False
      # The holder before us may have removed the file between our open and flock: then we hold a
      # lock on a deleted file, and must start over on the new one.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      old = _read_json(self.path)
      if old is not None and not kernel_lock and old.get("pid") != me["pid"]:
        # Without a kernel lock the file's contents decide.
        if old.get("host") != me["host"]:
          os.close(fd)
          raise self._busy(old, certain=False)
        if _pid_alive(int(old.get("pid", -1))):
          os.close(fd)
          raise self._busy(old, certain=True)
      if old is not None:
        self.stale_holder = old
      os.ftruncate(fd, 0)
      os.write(fd, (json.dumps(me) + "\n").encode())
      os.fsync(fd)
      self._fd = fd
      return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)  # closing drops the kernel lock
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ---- the record of a finished run ----

# Why a run ended; any of these keeps it finished on a rerun (unless train.continue_finished).
REASONS = ("num_steps", "stop_at_accuracy", "time_budget", "non_finite")


def read_finished(workdir: str) -> dict | None:
  """The finished-run record of `workdir` ({'reason', 'step', 'checkpoint_step', 'message',
  'summary'}), or None when the run has not finished."""
  rec = _read_json(os.path.join(workdir, FINISHED_FILE))
  if rec is None or rec.get("reason") not in REASONS:
    return None
  return rec


def write_finished(workdir: str, *, reason: str, step: int, checkpoint_step: int, message: str,
                   summary: dict[str, Any]) -> str:
  """Records (atomically) that the run ended for `reason` at `step`; its newest checkpoint is at
  `checkpoint_step` and `summary` is what train_and_evaluate returned."""
  assert reason in REASONS, reason
  path = os.path.join(workdir, FINISHED_FILE)
  rec = {"reason": reason, "step": int(step), "checkpoint_step": int(checkpoint_step),
         "message": message, "time": _now(), "summary": summary}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(rec, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)
  return path


def clear_finished(workdir: str) -> None:
  """Marks the run as not finished (it is being continued)."""
  try:
    os.remove(os.path.join(workdir, FINISHED_FILE))
  except FileNotFoundError:
    pass
