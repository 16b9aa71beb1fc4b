"""The one pretraining loop for every architecture (docs/design.md):
`train_and_evaluate(config, workdir)`.

mesh -> data -> model + optimizer under the mesh -> restore if a checkpoint exists -> loop. The step is
one `jax.jit` over the split NNX state with donated buffers; metrics are fetched one step late so the
host never waits on the device; eval, checkpoints, metrics.jsonl, TensorBoard, a progress bar and a
PNG of the curves come with it.

What it promises (docs/reliability.md): the config is checked before anything is read or compiled;
one process holds a workdir at a time; a step is checked for a non-finite loss or gradient norm
before it is evaluated or saved; the final step is always saved (a save that does not happen is an
error); unreadable checkpoints are moved aside and the previous one is used; a finished run stays
finished on a rerun unless `train.continue_finished` is set.
"""
from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memarch import checkpoint as ckpt_lib
from memarch import configs_lib, sharding
from memarch import flops as flops_lib
from memarch import metrics as metrics_lib
from memarch import step as step_lib
from memarch import workdir as workdir_lib
from memarch.data import loader, make_source
from memarch.data.mqar import IGNORE
from memarch.lm import LM, LMConfig, count_params
from memarch.optim import make_optimizer, schedule
from memarch.step import StepConfig


class TrainingError(RuntimeError):
  """A run stopped for a reason the user must fix (message says how)."""


# Model keys added after some workdirs were written: absent, they read as the LMConfig default.
_ADDED_MODEL_KEYS = {"param_dtype": LMConfig.param_dtype}


def check_workdir(workdir: str, config) -> None:
  """Refuses a workdir that holds checkpoints of a different model; never overwrites its config."""
  path = os.path.join(workdir, "config.json")
  has_ckpt = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
      n.isdigit() for n in os.listdir(os.path.join(workdir, "checkpoints")))
  if not os.path.exists(path) or not has_ckpt:
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except ValueError as e:
    raise TrainingError(f"{path} is unreadable ({e}), so the checkpoints in {workdir} cannot be "
                        "matched to a model; restore that file or use a new --workdir") from None
  new = configs_lib.to_dict(config)
  for section in ("model", "data"):
    o, n = old.get(section, {}), json.loads(json.dumps(new[section], default=str))
    if section == "model":
      # Keys added since the workdir was written read as their defaults; remat and scan_layers
      # change how the step is computed, not the model or its checkpoint.
      o = {**_ADDED_MODEL_KEYS, **o}
      for key in ("remat", "scan_layers"):
        o.pop(key, None)
        n.pop(key, None)
    keys = sorted(set(o) | set(n))
    diff = [k for k in keys if (section == "model" or k in ("name", "seq_len", "vocab_size",
                                                            "tokenizer"))
            and o.get(k) != n.get(k)]
    if diff:
      k = diff[0]
      raise TrainingError(
          f"workdir {workdir} holds a checkpoint of a different {section} ({section}.{k}: "
          f"{o.get(k)!r} there vs {n.get(k)!r} now); use a new --workdir or restore the old config")


def write_config(workdir: str, config, step: int) -> str:
  """Writes config.json (config.resumed_at_<step>.json when a resume changed it); in a multi-process
  run only process 0 writes."""
  path = os.path.join(workdir, "config.json")
  if jax.process_index() != 0:
    return path
  text = configs_lib.to_json(config)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    path = os.path.join(workdir, f"config.resumed_at_{step}.json")
  with open(path + ".tmp", "w") as f:  # a kill mid-write must not leave half a config
    f.write(text)
  os.replace(path + ".tmp", path)
  return path


class NonFiniteError(TrainingError):
  """The loss or the gradient norm of a step was not finite (the message names which)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


# Logged rows in a row with a gradient norm of exactly 0 before a run is flagged as not learning.
ZERO_GRAD_ROWS = 3


def _nonfinite_name(loss: float, grad_norm: float) -> str:
  """The quantity to name: the loss if it is not finite, else the gradient norm (the message
  prints both values)."""
  if not math.isfinite(loss):
    return "loss"
  return "grad_norm" if not math.isfinite(grad_norm) else "update"


def _io_error(e: OSError, workdir: str) -> TrainingError:
  where = e.filename or workdir
  if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
    return TrainingError(f"could not write {where}: {e.strerror}; free disk space or fix "
                         "permissions, then rerun the same command to resume from the newest "
                         "checkpoint")
  return TrainingError(f"I/O error on {where}: {e.strerror or e}")


def _jsonable(d: dict) -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, (bool, np.bool_)):
      out[k] = bool(v)
    elif isinstance(v, (int, np.integer)):
      out[k] = int(v)
    elif isinstance(v, (float, np.floating)):
      out[k] = float(v)
    else:
      out[k] = v
  return out


def _latest_values(metrics_path: str) -> dict[str, Any]:
  """The newest value of every metric in metrics.jsonl."""
  out: dict[str, Any] = {}
  for row in metrics_lib.read_metrics(metrics_path):
    out.update({k: v for k, v in row.items() if k != "step"})
  return out


def train_and_evaluate(config, workdir: str, *, max_steps_this_run: int | None = None,
                       quiet: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest checkpoint); returns final metrics.

  `max_steps_this_run` stops after that many steps (the run can be resumed later). The workdir is
  locked for the run (a second run on it refuses). A finished run (see `memarch.workdir`) is not
  trained again unless `train.continue_finished` is set; its recorded summary is returned, with
  `already_finished=True`.
  """
  if not str(workdir).strip():
    raise ValueError("the workdir is empty; pass a directory, e.g. --workdir=runs/my_run")
  workdir = os.path.abspath(workdir)
  t_start = time.time()
  # ---- everything that can be wrong with the config fails here, before any compute ----
  configs_lib.validate(config)
  metrics_lib.wandb_module(config.train.get("wandb_project", ""))  # a missing package fails here
  if max_steps_this_run is not None and max_steps_this_run < 1:
    raise ValueError(f"max_steps_this_run={max_steps_this_run} must be >= 1 (or None)")
  sharding.maybe_initialize_distributed(config.mesh)
  quiet = quiet or jax.process_index() != 0  # process 0 speaks for a multi-process run
  # One process holds the workdir; in a multi-process run that is process 0, for all of them.
  lock = workdir_lib.WorkdirLock(workdir)
  try:
    if jax.process_index() == 0:
      lock.acquire()
  except workdir_lib.WorkdirBusy as e:
    raise TrainingError(str(e)) from None
  except OSError as e:
    raise TrainingError(f"cannot use {e.filename or workdir} as a workdir ({e.strerror}); pass a "
                        "writable --workdir") from None
  log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
  try:
    if lock.stale_holder is not None:
      h = lock.stale_holder
      log(f"memarch: took over the lock left by pid {h.get('pid')} on {h.get('host')} "
          "(no longer running)")
    data = _make_data(config, workdir)
    lm_cfg = configs_lib.lm_config(config, data.vocab_size)
    opt_cfg = configs_lib.opt_config(config)
    if data.vocab_size > lm_cfg.vocab_size:
      raise TrainingError(f"model.vocab_size={lm_cfg.vocab_size} < data vocabulary "
                          f"{data.vocab_size}; set model.vocab_size=0 to take it from the data")
    check_workdir(workdir, config)
    try:
      return _train(config, workdir, data, lm_cfg, opt_cfg, max_steps_this_run, log, quiet,
                    t_start)
    except ckpt_lib.CheckpointError as e:
      raise TrainingError(str(e)) from e
    except OSError as e:
      raise _io_error(e, workdir) from e
  finally:
    lock.release()


def _restore(ckpt, state, log):
  """(state, first step to train, skipped steps so far) from the newest readable checkpoint;
  unreadable ones are moved aside, half-written saves of a killed run removed."""
  gone = ckpt.remove_partial_saves()
  if gone:
    log(f"memarch: removed {len(gone)} unfinished checkpoint save(s) of an earlier run: "
        f"{', '.join(sorted(gone))}")
  restored = ckpt.restore_latest(ckpt_lib.abstract_like(state), move_aside=True)
  if restored is not None:
    step, state, data_pos = restored
    log(f"memarch: resumed from checkpoint at step {step} in {ckpt.directory}")
    return state, int(data_pos["next_step"]), int(data_pos.get("skipped_steps", 0))
  if ckpt.unreadable:
    log(f"memarch: no readable checkpoint in {ckpt.directory} (moved aside: "
        f"{', '.join(os.path.basename(p) for p in ckpt.moved_aside)}); training from step 0")
  return state, 0, 0


def _finished_before(workdir, tc, start_step, primary, log) -> dict | None:
  """The recorded summary when the run in `workdir` already finished and stays so (None: train).
  A run that stopped on a non-finite step refuses unless told to go on."""
  rec = workdir_lib.read_finished(workdir)
  if rec is None:
    return None
  where = f"the run in {workdir} finished at step {rec['step']} ({rec['reason']})"
  if start_step != rec["checkpoint_step"]:
    warnings.warn(f"{where}, but its checkpoint at step {rec['checkpoint_step']} is gone; "
                  f"training again from step {start_step}")
  elif tc.continue_finished:
    log(f"memarch: {where}; continuing it (train.continue_finished=True)")
  elif rec["reason"] == "num_steps" and tc.num_steps > rec["step"]:
    log(f"memarch: {where}; extending it to train.num_steps={tc.num_steps}")
  elif rec["reason"] == "non_finite":
    raise TrainingError(
        f"{where}: {rec['message']}; to go on from its checkpoint at step {start_step}, set "
        "train.continue_finished=True (or use a new --workdir)")
  else:
    log(f"memarch: {where}: {rec['message']}; nothing to do (set "
        "train.continue_finished=True to train on, or use a new --workdir)")
    return dict(rec.get("summary") or {}, already_finished=True, finish_reason=rec["reason"])
  if primary:
    workdir_lib.clear_finished(workdir)
  return None


def _finish_reason(tc, step, last, stopped_early, out_of_time):
  """(reason, message) for finished.json; (None, None) when the run is to be continued (stopped
  by max_steps_this_run)."""
  if stopped_early:
    return "stop_at_accuracy", (f"reached eval/accuracy {last['eval/accuracy']:.4f} >= "
                                f"{tc.stop_at_accuracy} at step {step}")
  if out_of_time:
    return "time_budget", f"used up train.time_budget_s={tc.time_budget_s:g}"
  if step >= tc.num_steps:
    return "num_steps", f"reached train.num_steps={tc.num_steps}"
  return None, None


class Evaluator:
  """A run's held-out evaluation. Text sources (lm_eval) score fixed rows of their held-out split:
  loss, bits per byte and perplexity; the synthetic tasks score their eval set by accuracy and
  loss. `predict` is a `memarch.step.jit_eval_step` function."""

  def __init__(self, config, data, predict, mesh=None):
    self.batch_size = config.data.batch_size
    self.predict = predict
    self.compile_sec: float | None = None  # set by the first call that compiles `predict`
    self.mesh = mesh if mesh is not None else sharding.single_device_mesh()
    self.rows = sharding.process_rows(self.mesh, self.batch_size)
    self.lm_eval = bool(getattr(data, "lm_eval", False))
    if self.lm_eval:
      self.eval_set = data.eval_set(int(config.data.get("eval_rows", 32)))
    else:
      self.eval_set = (data.eval_set(config.data.eval_examples) if hasattr(data, "eval_set")
                       else None)

  def __call__(self, state) -> dict[str, float]:
    if self.eval_set is None:
      return {}
    bs, n = self.batch_size, len(self.eval_set["inputs"])
    correct, nats, count, nbytes = [], 0.0, 0, 0
    out = {}  # eval/compile_sec, on the call that compiled `predict`
    for i in range(0, n, bs):
      sl = {k: v[i:i + bs] for k, v in self.eval_set.items()}
      pad = bs - len(sl["inputs"])
      if pad:  # keep one compiled shape
        sl = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in sl.items()}
      mine = {k: sl[k][self.rows[0]:self.rows[1]] for k in ("inputs", "segment_ids", "targets")}
      batch = sharding.global_batch(self.mesh, mine, bs)
      if self.compile_sec is None and hasattr(self.predict, "lower"):
        # Compiled ahead of the call so the compile time is measured on its own; the call below
        # finds this program in jit's cache and does not compile it again.
        t0 = time.perf_counter()
        self.predict.lower(state, batch).compile()
        self.compile_sec = time.perf_counter() - t0
        out = {"eval/compile_sec": self.compile_sec}
      preds, nll = self.predict(state, batch)
      preds = sharding.to_host(preds)[:bs - pad]
      nll = sharding.to_host(nll).astype(np.float64)[:bs - pad]
      tgt = sl["targets"][:bs - pad]
      mask = tgt != IGNORE
      correct.append(((preds == tgt) & mask).sum(-1) / np.maximum(mask.sum(-1), 1))
      nats += float(nll.sum())
      count += int(mask.sum())
      if "target_bytes" in sl:
        nbytes += int(sl["target_bytes"][:bs - pad].sum())
    loss = nats / max(count, 1)
    if self.lm_eval:
      # Bits per byte: all nats of the targets (EOS included) over the UTF-8 bytes they stand
      # for, so byte-level and BPE models compare (docs/data.md).
      return {"eval/loss": loss, "eval/bits_per_byte": nats / math.log(2) / max(nbytes, 1),
              "eval/perplexity": math.exp(min(loss, 700.0)), **out}
    return {"eval/accuracy": float(np.concatenate(correct).mean()), "eval/loss": loss, **out}


def _make_data(config, workdir: str):
  """The run's data source. In a multi-process run process 0 builds it first (it may train and
  save the BPE tokenizer into the workdir) and the others then build theirs, reading that file."""
  build = lambda: make_source(config.data, seed=config.seed, workdir=workdir)  # noqa: E731
  if jax.process_count() == 1:
    return build()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = build() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("memarch: data source built by process 0")
  return data if data is not None else build()


def _plot_curves(writer, workdir: str, title: str) -> str:
  """curves.png of the run's metrics (drawn by the process that writes them)."""
  png = os.path.join(workdir, "curves.png")
  if isinstance(writer, _NoWriter):
    return png
  return metrics_lib.plot_curves(writer.path, png, title=title)


class _NoWriter:
  """The metrics writer of processes other than 0 in a multi-process run: writes nothing."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step, row) -> None:
    pass

  def close(self) -> None:
    pass


class _StepLog:
  """Checks each step's metrics (one step late, so the host never waits) and builds the logged
  rows: a non-finite step stops the run (or is counted, with train.skip_nonfinite), and a
  gradient norm of exactly 0 over several logged rows is flagged once."""

  def __init__(self, config, end_step, lr_at, t_start, vocab_size, skipped, log,
               flops_per_token: float = 0.0, num_devices: int = 1):
    self.tc, self.end_step, self.lr_at, self.t_start = config.train, end_step, lr_at, t_start
    self.slots_per_step = config.data.batch_size * config.data.seq_len  # padding included
    self.vocab_size, self.skipped, self.log = vocab_size, skipped, log
    self.flops_per_token, self.num_devices = flops_per_token, num_devices
    self.peak_flops = float(config.train.get("peak_flops", 0.0))
    self.t_last = time.time()
    self.tokens_since = self.slots_since = self.targets_since = 0
    self.steps_since = 0
    self.paused_sec = 0.0  # time inside the interval that was not training (eval, saving, compile)
    self.compile_sec: float | None = None  # logged once, in the next row
    self.zero_steps = self.zero_rows = 0  # steps / logged rows in a row with grad norm exactly 0
    self.zero_flagged = False

  def check(self, step, m, real_tokens: int | None = None) -> dict | None:
    """The row to log for `step` (None between logged steps); raises NonFiniteError.
    `real_tokens`: the step's non-padding input tokens (segment id != 0; default all)."""
    tc = self.tc
    if not stats_due(step, tc.stats_every):
      # Every step collects the statistics (one compiled program); only stats steps log them.
      m = {k: v for k, v in m.items() if not k.startswith("stats/")}
    m = jax.device_get(m)
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if not bool(m["finite"]):
      bad = _nonfinite_name(loss, gnorm)
      if not tc.skip_nonfinite:
        raise NonFiniteError(
            f"non-finite {bad} at step {step} (loss={loss}, grad_norm={gnorm}); lower opt.lr, "
            "raise opt.warmup_steps, or set train.skip_nonfinite=True", step)
      self.skipped += 1
      self.log(f"memarch: skipped step {step}: non-finite {bad}")
    self.zero_steps = self.zero_steps + 1 if gnorm == 0.0 else 0
    self.tokens_since += self.slots_per_step if real_tokens is None else int(real_tokens)
    self.slots_since += self.slots_per_step
    self.targets_since += int(m["tokens"])
    self.steps_since += 1
    if not (step % tc.log_every == 0 or step == self.end_step):
      return None
    now = time.time()
    dt = max(now - self.t_last, 1e-9)
    # Throughput counts real tokens: inputs whose segment id is not 0 (padding is not work done),
    # beside every slot of the batch (the number logged before) and the labelled targets.
    row = {"train/loss": loss, "train/accuracy": float(m["acc"]), "train/grad_norm": gnorm,
           "train/lr": float(self.lr_at(step)),
           "train/tokens_per_sec": self.tokens_since / dt,
           "train/slot_tokens_per_sec": self.slots_since / dt,
           "train/target_tokens_per_sec": self.targets_since / dt,
           "train/elapsed_sec": now - self.t_start,
           # mean wall time of a training step in the interval, evals/saves/compiling left out
           "train/step_sec": max(dt - self.paused_sec, 0.0) / max(self.steps_since, 1)}
    if self.compile_sec is not None:
      row["train/compile_sec"], self.compile_sec = self.compile_sec, None
    if self.peak_flops > 0 and self.flops_per_token > 0:
      row["train/mfu"] = flops_lib.mfu(self.flops_per_token, row["train/tokens_per_sec"],
                                       self.peak_flops, self.num_devices)
    row.update({k: float(v) for k, v in m.items() if k.startswith(("aux/", "stats/"))})
    if tc.skip_nonfinite:
      # A skipped step's NaN values are not written; the count of skipped steps is.
      row = {k: v for k, v in row.items() if math.isfinite(v)}
      row["train/skipped_steps"] = self.skipped
    if self.zero_steps:
      row["train/zero_grad_steps"] = self.zero_steps
    self.zero_rows = self.zero_rows + 1 if gnorm == 0.0 else 0
    if self.zero_rows >= ZERO_GRAD_ROWS and not self.zero_flagged:
      self.zero_flagged = True
      warnings.warn(
          f"the gradient norm was exactly 0 in {self.zero_rows} logged steps in a row (through "
          f"step {step}; train/loss {loss:.4f}, ln(vocab_size) {math.log(self.vocab_size):.4f}):"
          " nothing is learning; check the data's targets, the loss and train.aux_loss_weights")
    self.t_last = now
    self.tokens_since = self.slots_since = self.targets_since = self.steps_since = 0
    self.paused_sec = 0.0
    return row

  def pause(self, seconds: float) -> None:
    """Counts `seconds` of non-training time (eval, checkpoint, compile) out of train/step_sec."""
    self.paused_sec += seconds


def _show_progress(progress, row, last, lm_eval: bool) -> None:
  if progress is None:
    return
  shown = (dict(bpb=f"{last.get('eval/bits_per_byte', float('nan')):.3f}") if lm_eval
           else dict(acc=f"{last.get('eval/accuracy', float('nan')):.3f}"))
  progress.set_postfix(loss=f"{row.get('train/loss', float('nan')):.4f}",
                       tok_s=f"{row['train/tokens_per_sec']:.0f}", **shown)


def _record_non_finite(ckpt, workdir, e: NonFiniteError, summary: dict) -> None:
  """finished.json for a run stopped by a non-finite step, after its pending saves."""
  try:
    ckpt.wait()
  except ckpt_lib.CheckpointError as save_err:
    warnings.warn(str(save_err))
  steps = ckpt.steps()
  workdir_lib.write_finished(workdir, reason="non_finite", step=e.step,
                             checkpoint_step=steps[-1] if steps else 0, message=str(e),
                             summary=_jsonable(summary))


def _close_checkpointer(ckpt, *, failing: bool) -> None:
  """Waits for the saves; when the run is already failing, a failed save is a warning rather
  than an error that would hide the first one."""
  if not failing:
    ckpt.close()
    return
  try:
    ckpt.close()
  except ckpt_lib.CheckpointError as e:
    warnings.warn(str(e))


def _close(*things) -> None:
  """Closes each of `things` that exists (the run's profiler and metric writer)."""
  for thing in things:
    if thing is not None:
      thing.close()


_count_nonzero = jax.jit(jnp.count_nonzero)


def _real_tokens(batch) -> jax.Array | None:
  """Non-padding input tokens of a global batch (segment id != 0), counted on the devices (so every
  process's rows count) and read when the step is logged; None when the batch has no ids."""
  return _count_nonzero(batch["segment_ids"]) if "segment_ids" in batch else None


def _make_writer(config, workdir: str, primary: bool):
  """metrics.jsonl + TensorBoard, and Weights & Biases when train.wandb_project is set; on processes
  other than 0 a writer that writes nothing."""
  if not primary:
    return _NoWriter(workdir)
  tc = config.train
  wandb = metrics_lib.wandb_module(tc.get("wandb_project", ""))
  run = None
  if wandb is not None:
    run = wandb.init(project=tc.wandb_project, dir=workdir, name=os.path.basename(workdir),
                     config=configs_lib.to_dict(config), resume="allow")
  return metrics_lib.MetricWriter(workdir, wandb_run=run)


class _Profiler:
  """train.profile_steps 'a,b': a jax.profiler trace of steps a..b in <workdir>/profile/ (process 0
  only). The trace starts before step a's call and stops once step b's results are ready, so it
  holds the device work of exactly those steps; a run that ends or fails earlier stops it too."""

  def __init__(self, tc, workdir: str, primary: bool, start_step: int, log):
    steps = configs_lib.profile_steps(tc.get("profile_steps", ""))
    self.first, self.last = steps if steps else (0, -1)
    # a resumed run that starts inside the window traces what is left of it
    self.first = max(self.first, start_step + 1)
    self.enabled = primary and self.first <= self.last
    self.dir = os.path.join(workdir, "profile")
    self.active = False
    self.log = log

  def before(self, step: int) -> None:
    if self.enabled and step == self.first and not self.active:
      jax.profiler.start_trace(self.dir)
      self.active = True

  def after(self, step: int, outputs) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(outputs)
      self.close()
      self.log(f"memarch: profile of steps {self.first}..{self.last} written to {self.dir} "
               "(open it with TensorBoard's profile plugin or Perfetto)")

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def _make_mesh(mesh_cfg):
  devices = jax.devices()[:mesh_cfg.num_devices] if mesh_cfg.num_devices else None
  return sharding.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices)


def _make_progress(tc, start_step: int, quiet: bool):
  """A tqdm bar over the run's steps on stderr (None with train.progress=False or quiet)."""
  if not tc.progress or quiet:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=tc.num_steps, initial=start_step, desc="train", dynamic_ncols=True,
              file=sys.stderr)


def _due(step: int, every: int) -> bool:
  """Whether a periodic action (every `every` steps; 0 = never) falls on `step`."""
  return bool(every) and step % every == 0


def stats_due(step: int, stats_every: int) -> bool:
  """Whether `step` logs the layer statistics: every stats_every steps and step 1 (0 = never)."""
  return _due(step, stats_every) or (step == 1 and bool(stats_every))


def _evaluate_and_log(evaluate, state, step, last, writer, tc) -> bool:
  """Runs the held-out eval, logs it; whether train.stop_at_accuracy is reached."""
  if evaluate.eval_set is None:
    return False
  ev = evaluate(state)
  last.update(ev)
  writer.write(step, ev)
  return bool(tc.stop_at_accuracy) and ev.get("eval/accuracy", 0.0) >= tc.stop_at_accuracy


def _train(config, workdir, data, lm_cfg, opt_cfg, max_steps_this_run, log, quiet, t_start):
  """The run itself, inside the workdir lock (see `train_and_evaluate`)."""
  tc = config.train
  primary = jax.process_index() == 0  # writes the run's records
  mesh = _make_mesh(config.mesh)

  with sharding.mesh_context(mesh):
    model = LM(lm_cfg, rngs=nnx.Rngs(config.seed))
    tx = make_optimizer(opt_cfg, tc.num_steps, model)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  n_params = count_params(model)
  flops = flops_lib.flops_per_token(lm_cfg, nnx.state(model, nnx.Param), config.data.seq_len)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
  writer = progress = profiler = None
  completed = False
  try:
    state, start_step, skipped = _restore(ckpt, state, log)

    # ---- a finished run stays finished ----
    summary = _finished_before(workdir, tc, start_step, primary, log)
    if summary is not None:
      completed = True
      return summary
    write_config(workdir, config, start_step)

    # Only packed sources (several documents per row) need segment ids; every mixer then runs each
    # document as if alone (docs/packed_documents.md).
    packed = bool(getattr(data, "pack", False))
    step_cfg = StepConfig.from_config(config, packed=packed)
    step_fn = step_lib.jit_train_step(graphdef, step_cfg)
    predict = step_lib.jit_eval_step(graphdef, step_cfg)
    lr_at = schedule(opt_cfg, tc.num_steps)

    evaluate = Evaluator(config, data, predict, mesh)

    writer = _make_writer(config, workdir, primary)
    end_step = (tc.num_steps if max_steps_this_run is None
                else min(tc.num_steps, start_step + max_steps_this_run))
    progress = _make_progress(tc, start_step, quiet)
    log(f"memarch: {n_params:,} parameters; mixers {lm_cfg.layer_pattern}; data "
        f"{config.data.name} (seq_len {config.data.seq_len}, batch {config.data.batch_size}); "
        f"mesh {sharding.describe(mesh)}; {flops.train / 1e9:.4g} GFLOP/token; workdir {workdir}")

    pending = None
    last: dict[str, Any] = {}
    stopped_early = out_of_time = False
    step_log = _StepLog(config, end_step, lr_at, t_start, lm_cfg.vocab_size, skipped, log,
                        flops_per_token=flops.train, num_devices=mesh.size)
    profiler = _Profiler(tc, workdir, primary, start_step, log)

    def flush():
      """Checks and logs the step whose metrics are still on the device, if any."""
      nonlocal pending
      if pending is None:
        return
      (s, m, real), pending = pending, None
      row = step_log.check(s, m, real)
      if row is None:
        return
      last.update(row)
      writer.write(s, row)
      _show_progress(progress, row, last, evaluate.lm_eval)

    step = start_step
    # Each process loads only its rows of every batch; step s trains on batch s - 1.
    batch_size = config.data.batch_size
    local_batches = loader.batches(data, start_step, end_step,
                                   sharding.process_rows(mesh, batch_size))
    # With statistics on, every step collects them so the step compiles once (they cost ~1%).
    collect = bool(tc.stats_every)
    try:
      with sharding.mesh_context(mesh):
        for step in range(start_step + 1, end_step + 1):
          batch = sharding.global_batch(mesh, next(local_batches), batch_size)
          real = _real_tokens(batch)
          if step == start_step + 1:
            # One program for the whole run, compiled here so its time is logged on its own
            # (train/compile_sec); the calls below find it in jit's cache.
            t0 = time.perf_counter()
            step_fn.lower(state, batch, collect).compile()
            step_log.compile_sec = time.perf_counter() - t0
            step_log.pause(step_log.compile_sec)
          profiler.before(step)
          state, m = step_fn(state, batch, collect)
          profiler.after(step, m)
          flush()
          pending = (step, m, real)
          if progress is not None:
            progress.update(1)
          # A wall-clock budget (train.time_budget_s, compile included) ends the run with an
          # eval, as "accuracy reached in N minutes" comparisons need.
          over_budget = bool(tc.time_budget_s) and time.time() - t_start >= tc.time_budget_s
          at_end = step == end_step or over_budget
          is_eval = _due(step, tc.eval_every) or at_end
          is_save = _due(step, tc.ckpt_every) or at_end
          if is_eval or is_save:
            flush()  # a step is checked (finite) before it is evaluated or saved
          t_pause = time.perf_counter()
          if is_eval:
            stopped_early = _evaluate_and_log(evaluate, state, step, last, writer, tc)
          if over_budget and not stopped_early:
            log(f"memarch: time budget of {tc.time_budget_s:.0f}s used up at step {step}; stopping")
            out_of_time = True
          if is_save or stopped_early:
            ckpt.save(step, state, {"next_step": step, "data": config.data.name,
                                    "skipped_steps": step_log.skipped})
          step_log.pause(time.perf_counter() - t_pause)
          if stopped_early or out_of_time:
            break
        flush()
    except NonFiniteError as e:
      # The run ends here for good (a rerun would meet the same step); record it as finished.
      if primary:
        _record_non_finite(ckpt, workdir, e, dict(last, step=e.step, num_params=n_params))
      raise
    ckpt.wait()  # the last checkpoint is on disk before the run counts as finished

    png = _plot_curves(writer, workdir, f"{', '.join(lm_cfg.layer_pattern)} on {config.data.name}")
    if step == start_step:  # nothing left to train: report the run's newest metrics
      last = dict(_latest_values(writer.path), **last)
    last.update(step=step, stopped_early=stopped_early, out_of_time=out_of_time,
                wall_sec=time.time() - t_start, num_params=n_params)
    if tc.skip_nonfinite:
      last["skipped_steps"] = step_log.skipped
    reason, message = _finish_reason(tc, step, last, stopped_early, out_of_time)
    if stopped_early:
      log(f"memarch: {message}; stopping")
    if reason is not None and primary:
      workdir_lib.write_finished(workdir, reason=reason, step=step, checkpoint_step=step,
                                 message=message, summary=_jsonable(last))
    log(f"memarch: done at step {step} in {last['wall_sec']:.1f}s. metrics: {writer.path}; "
        f"TensorBoard: {os.path.join(workdir, 'tensorboard')}; checkpoints: {ckpt.directory}; "
        f"plot: {png}")
    completed = True
    return last
  finally:
    _close(profiler, writer)
    if progress is not None:
      progress.close()
    _close_checkpointer(ckpt, failing=not completed)
