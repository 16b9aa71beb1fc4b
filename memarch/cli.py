"""The boundary every script runs behind (scripts/train.py, scripts/eval.py, scripts/sample.py).

`cli.run(main)` parses the flags, keeps library INFO logging (absl, Orbax) and library deprecation
warnings quiet, and turns any error into one line on stderr, `error: <what is wrong>`, with exit
status 2. `--verbose` brings back the traceback, the INFO logs and every warning.

Nothing here imports jax, so a bad flag or config argument fails in well under a second, and the
workdir checks (`trained_workdir`) run before a model is built.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import sys
import traceback
import warnings

from absl import app, flags
from absl import logging as absl_logging

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
MAX_MESSAGE_CHARS = 600

VERBOSE_HELP = "on an error print the traceback; show library INFO logs and every warning"


class CliError(ValueError):
  """Bad input to a script (a flag, an argument, a workdir); the message says how to fix it."""


# Errors whose message is written for the user: these, and every exception class memarch defines
# (TrainingError, EvalError, ...). Anything else is shown with its type, as a bug.
_USER_ERRORS = (ValueError, OSError, ImportError, NotImplementedError, app.UsageError, flags.Error)


def _is_user_error(exc: BaseException) -> bool:
  """Expected errors: the types above, memarch's own, and a KeyError with a sentence for a message
  (a bare KeyError('name') is a bug: its type and the hint to --verbose are kept)."""
  if isinstance(exc, KeyError):
    return bool(exc.args) and " " in str(exc.args[0])
  return isinstance(exc, _USER_ERRORS) or any(
      t.__module__.startswith("memarch") for t in type(exc).__mro__)


def _inner(exc: BaseException) -> BaseException | None:
  return exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def message(exc: BaseException) -> str:
  """The one line a user sees for `exc` (no 'error: ' prefix).

  absl re-raises a flag parser's error as 'flag --x=v: <error>', and ml_collections re-raises an
  error of a config file's get_config() with the whole traceback in its message; both are unwrapped
  to the original error, keeping the flag as a prefix.
  """
  prefix = ""
  while True:
    text = str(exc)
    wrapped = "Error whilst parsing config file" in text or "Traceback (most recent" in text
    if not wrapped or _inner(exc) is None:
      break
    head = text.split(": Error whilst parsing config file", 1)
    if len(head) == 2 and not prefix:
      prefix = head[0] + ": "
    exc = _inner(exc)
  if isinstance(exc, OSError) and exc.filename and exc.strerror:
    text = f"{exc.filename}: {exc.strerror}"  # no '[Errno 13]'
  elif isinstance(exc, KeyError) and _is_user_error(exc):
    text = str(exc.args[0])  # str(KeyError) wraps the message in quotes
  else:
    text = str(exc) or type(exc).__name__
  if not _is_user_error(exc):
    text = f"{type(exc).__name__}: {text} (rerun with --verbose for the traceback)"
  required = re.fullmatch(r"flag --(\w+)=None: Flag --\1 must have a value other than None\.", text)
  if required:
    text = f"--{required.group(1)} is required"
  text = " ".join((prefix + text).split())  # one line
  if len(text) > MAX_MESSAGE_CHARS:
    text = text[:MAX_MESSAGE_CHARS - 3] + "..."
  return text


def fail(exc: BaseException, verbose: bool | None = None) -> None:
  """Prints `error: <one line>` (after the traceback with --verbose) and exits with status 2."""
  if verbose is None:
    verbose = _verbose()
  if verbose:
    traceback.print_exception(exc, file=sys.stderr)
  print(f"error: {message(exc)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_ERROR)


def _verbose(argv=None) -> bool:
  if flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS:
    return bool(flags.FLAGS.verbose)
  return any(re.match(r"^--?verbose(=(true|t|1|yes))?$", a, re.IGNORECASE)
             for a in (argv or sys.argv))


# ---------------------------------------------------------------------------------------------------
# Flag parsing


def _config_arg(argv) -> str | None:
  """The value of --config in argv ('configs/titans.py:variant=mag'), or None when absent."""
  for i, a in enumerate(argv[1:], 1):
    if a == "--":
      break
    m = re.match(r"^--?config(=(.*))?$", a)
    if m:
      if m.group(1) is not None:
        return m.group(2)
      return argv[i + 1] if i + 1 < len(argv) else ""
  return None


def check_config_arg(argv) -> None:
  """Refuses an empty or missing config file before ml_collections reads it (it defers a missing
  file to the first use of the config, with a multi-line message)."""
  if "config" not in flags.FLAGS:
    return
  spec = _config_arg(argv)
  if spec is None:
    if _overrides(argv):
      raise CliError(f"--config.{_overrides(argv)[0]} overrides a config, but no --config=<file> "
                     "is given, e.g. --config=configs/titans.py")
    return
  path = spec.split(":", 1)[0]
  if not path:
    raise CliError("--config is empty; pass a config file, e.g. --config=configs/titans.py")
  if not os.path.isfile(path):
    where = os.path.dirname(path) or "."
    if not os.path.isdir(where) and os.path.isdir("configs"):
      where = "configs"
    known = sorted(os.path.basename(p) for p in glob.glob(os.path.join(where, "*.py"))
                   if not p.endswith("__init__.py"))
    hint = f"; {where}/ has {', '.join(known)}" if known else ""
    raise CliError(f"config file {path!r} does not exist{hint}")


def _overrides(argv) -> list[str]:
  """['model.d_model', ...] from --config.model.d_model=128 (and --noconfig.x) in argv."""
  out = []
  for a in argv[1:]:
    m = re.match(r"^--?(no)?config\.([^=]+)", a)
    if m:
      out.append(m.group(2))
  return out


def unknown_override(argv) -> CliError | None:
  """The error for an override naming no field of the config (--config.model.not_a_key=3), which
  ml_collections reports as a bare AttributeError; None when every override names a field."""
  spec = _config_arg(argv)
  if not spec:
    return None
  try:
    from memarch import configs_lib
    cfg = configs_lib.load_config(spec)
  except Exception:  # noqa: BLE001 - the config's own error is reported instead
    return None
  for path in _overrides(argv):
    node, walked = cfg, []
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        where = "config." + ".".join(walked) if walked else "the config"
        keys = f"; its fields: {', '.join(sorted(node.keys()))}" if hasattr(node, "keys") else ""
        return CliError(f"--config.{path}: {where} has no field {part!r}{keys}")
      node = node[part]
      walked.append(part)
  return None


def _parse_flags(argv):
  try:
    check_config_arg(argv)
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - every parse error becomes one line
    if not isinstance(e, (flags.Error, CliError)):  # raised while loading the config file
      spec = _config_arg(argv)
      e = unknown_override(argv) or (CliError(
          f"--config={spec} did not load: {type(e).__name__}: {e} (a config file defines "
          "get_config(arg=None) returning a ConfigDict)") if spec else e)
    fail(e, verbose=_verbose(argv))


# ---------------------------------------------------------------------------------------------------
# Quiet libraries


def _show_warning(msg, category, filename, lineno, file=None, line=None):
  """Warnings of our own code (UserWarning, RuntimeWarning) as one line; library deprecation notes
  only with --verbose. "coroutine ... was never awaited" is dropped too: memarch has no coroutines,
  and Orbax leaves one behind when a restore fails, reported whenever it is garbage-collected."""
  if not issubclass(category, (UserWarning, RuntimeWarning)):
    return
  if issubclass(category, RuntimeWarning) and str(msg).endswith("was never awaited"):
    return
  print(f"warning: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)


def _unraisable(args) -> None:
  """Drops Orbax's 'Event loop is closed' noise (reads of an unreadable checkpoint completing after
  its event loop closed, dozens per checkpoint); anything else goes to Python's default hook."""
  if isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(args.exc_value):
    return
  sys.__unraisablehook__(args)


def _orbax_task_noise(record) -> bool:
  """Logging filter for asyncio: drops 'Task/Future exception was never retrieved' about Orbax's
  and TensorStore's reads (a failed restore's sibling reads, garbage-collected later;
  restore_latest already reported it). Other never-retrieved exceptions are kept."""
  msg = str(record.msg)
  never_retrieved = msg.startswith(("Task exception was never retrieved",
                                    "Future exception was never retrieved"))
  return not (never_retrieved and ("orbax" in msg or "tensorstore" in msg))


def quiet_libraries() -> None:
  """absl/Orbax INFO logs off and warnings as one line; called by `run` after the flags are parsed,
  unless --verbose. Only the script's process is affected: library functions never change logging."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  sys.unraisablehook = _unraisable
  logging.getLogger("asyncio").addFilter(_orbax_task_noise)
  warnings.showwarning = _show_warning


def run(main, *, interrupted: str = "interrupted") -> None:
  """`app.run(main)` behind the boundary: one line and exit status 2 for any error; Ctrl-C prints
  `error: <interrupted>` and exits with 130."""

  if "verbose" not in flags.FLAGS:  # defined here, so importing this module changes no flags
    flags.DEFINE_bool("verbose", False, VERBOSE_HELP)

  def wrapped(argv):
    if not flags.FLAGS.verbose:
      quiet_libraries()
    try:
      return main(argv)
    except KeyboardInterrupt:
      print(f"error: {interrupted}", file=sys.stderr, flush=True)
      sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
      raise
    except Exception as e:  # noqa: BLE001 - the boundary: every error becomes one line
      fail(e)

  app.run(wrapped, flags_parser=_parse_flags)


# ---------------------------------------------------------------------------------------------------
# Checks shared by the scripts (no jax)


def no_extra_args(argv, hint: str = "") -> None:
  """Refuses positional arguments (a forgotten '--workdir=' would otherwise be ignored)."""
  if len(argv) > 1:
    raise CliError(f"unexpected argument{'s' if len(argv) > 2 else ''} {' '.join(argv[1:])!r}"
                   + (f"; {hint}" if hint else "; flags take the form --name=value"))


def workdir_arg(value: str | None, *, flag: str = "--workdir", writable: bool = False) -> str | None:
  """The --workdir value, refused when empty (it would write into the current folder) or a file;
  with `writable`, also when it cannot be created or written (checked before any compute)."""
  if value is None:
    return None
  if not value.strip():
    raise CliError(f"{flag} is empty; pass a directory, e.g. {flag}=runs/my_run")
  if os.path.exists(value) and not os.path.isdir(value):
    raise CliError(f"{flag}={value} is a file, not a directory")
  if writable:
    existing = os.path.abspath(value)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise CliError(f"{flag}={value} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
      raise CliError(f"{flag}={value} is not writable ({existing}: permission denied); choose "
                     "another directory")
  return value


def checkpoint_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def trained_workdir(workdir: str, *, train_hint: str = ""):
  """The config (a plain dict from config.json) of a training workdir that has a checkpoint;
  a CliError naming what is missing otherwise."""
  hint = train_hint or f"train first with scripts/train.py --config=... --workdir={workdir}"
  if not os.path.isdir(workdir):
    raise CliError(f"workdir {workdir} does not exist; {hint}")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise CliError(f"{workdir} has no config.json: not a memarch training workdir ({hint})")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except ValueError as e:
    raise CliError(f"{path} is not valid JSON ({e}); it is written by scripts/train.py") from None
  if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), dict) or not isinstance(
      cfg.get("model"), dict):
    raise CliError(f"{path} has no model and data sections: not a memarch training config")
  if not checkpoint_steps(workdir):
    raise CliError(f"no checkpoint in {workdir}/checkpoints; {hint}")
  return cfg
