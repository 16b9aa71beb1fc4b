"""What the training loop promises when things go wrong (docs/reliability.md): unreadable
checkpoints are moved aside and the final step is saved again, a save that does not happen or fails
is one clear error and leaves no partial directory, a workdir is held by one process, a finished
run stays finished, nonsense settings are refused before anything runs, and a non-finite or
all-zero gradient is named."""
import errno
import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memarch import checkpoint as ckpt_lib
from memarch import configs_lib, sharding, testing
from memarch import step as step_lib
from memarch import train as train_lib
from memarch import workdir as workdir_lib
from memarch.metrics import read_metrics
from memarch.train import TrainingError, train_and_evaluate

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


tiny_config = testing.tiny_config


def rows(workdir):
  return read_metrics(os.path.join(str(workdir), "metrics.jsonl"))


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in rows(workdir) if "train/loss" in r}


def step_dirs(workdir):
  d = os.path.join(str(workdir), "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def aside(workdir):
  return sorted(n for n in os.listdir(os.path.join(str(workdir), "checkpoints"))
                if ".unreadable-" in n)


def corrupt(workdir, step):
  for root, _, files in os.walk(os.path.join(str(workdir), "checkpoints", str(step))):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")


def readable_steps(workdir, cfg):
  """Steps whose checkpoint restores, with finite values throughout."""
  from flax import nnx

  from memarch.data import make_source
  from memarch.lm import LM
  from memarch.optim import make_optimizer
  data = make_source(cfg.data, seed=cfg.seed)
  with sharding.mesh_context():
    model = LM(configs_lib.lm_config(cfg, data.vocab_size), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(configs_lib.opt_config(cfg), cfg.train.num_steps),
                        wrt=nnx.Param)
  abstract = ckpt_lib.abstract_like(nnx.split((model, opt))[1])
  ck = ckpt_lib.Checkpointer(os.path.join(str(workdir), "checkpoints"))
  ok = []
  for s in ck.steps():
    try:
      import orbax.checkpoint as ocp
      out = ck.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
      if all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out["state"])
             if jnp.issubdtype(x.dtype, jnp.floating)):
        ok.append(s)
    except Exception:  # noqa: BLE001
      pass
  ck.close()
  return ok


# ---- 1. unreadable checkpoints, and saves that do not happen ----

def test_unreadable_final_checkpoint_is_moved_aside_and_saved_again(tmp_path):
  cfg = tiny_config()
  train_and_evaluate(cfg, str(tmp_path), quiet=True)
  ref = losses(tmp_path)
  corrupt(tmp_path, 8)  # the final step
  partial = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1"  # a save cut short by a kill
  partial.mkdir()
  with (pytest.warns(UserWarning, match="step 8 .* is unreadable.*moved to 8.unreadable-"),
        pytest.warns(UserWarning, match="finished at step 8 .* checkpoint at step 8 is gone; "
                                        "training again from step 4")):
    out = train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert out["step"] == 8 and not out.get("already_finished")
  assert not partial.exists()
  assert len(aside(tmp_path)) == 1 and aside(tmp_path)[0].startswith("8.unreadable-")
  assert step_dirs(tmp_path) == [4, 8] and readable_steps(tmp_path, cfg) == [4, 8]
  assert losses(tmp_path) == ref  # steps 5-8 retrained from step 4, bit for bit
  # Every checkpoint unreadable: all moved aside, training starts over and saves again.
  corrupt(tmp_path, 4)
  corrupt(tmp_path, 8)
  with pytest.warns(UserWarning, match="unreadable"):
    out = train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert out["step"] == 8
  assert len(aside(tmp_path)) == 3 and readable_steps(tmp_path, cfg) == [4, 8]
  assert losses(tmp_path) == ref


def test_a_save_that_does_not_happen_is_an_error(tmp_path):
  state = {"w": jnp.arange(4.0)}
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
  ck.save(4, state, {"next_step": 4})
  ck.wait()
  with pytest.raises(ckpt_lib.CheckpointError, match="step 3 was not saved.*already holds step 4"):
    ck.save(3, state, {"next_step": 3})  # Orbax declines any step <= the newest
  ck.close()
  with pytest.raises(ValueError, match="at least one"):
    ckpt_lib.Checkpointer(str(tmp_path / "other"), keep=0)


# Orbax's save thread posts to the event loop that the failed save has closed: noise, which the
# scripts drop too (memarch.cli._unraisable).
@pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored.*Event loop is closed:pytest.PytestUnraisableExceptionWarning")
def test_full_disk_during_save_leaves_nothing_partial_and_resumes(tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
  real = jh.JsonCheckpointHandler._save_fn

  async def full_disk(self, x, directory):
    if x.get("next_step") == 8:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await real(self, x, directory)

  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full_disk)
  cfg = tiny_config()
  with pytest.raises(TrainingError, match=r"could not save the checkpoint at step 8 .*No space "
                     r"left on device.*rerun the same command to resume from step 4"):
    train_and_evaluate(cfg, str(tmp_path), quiet=True)
  names = os.listdir(tmp_path / "checkpoints")
  assert not [n for n in names if "tmp" in n], names
  assert step_dirs(tmp_path) == [4]
  assert not os.path.exists(tmp_path / workdir_lib.FINISHED_FILE)
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)
  monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", real)  # space is back
  out = train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert out["step"] == 8 and step_dirs(tmp_path) == [4, 8]
  assert json.load(open(tmp_path / workdir_lib.FINISHED_FILE))["reason"] == "num_steps"


# ---- 2. one process per workdir ----

def test_second_run_on_a_held_workdir_refuses_naming_the_holder(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from memarch.workdir import WorkdirLock; "
       "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
       str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TrainingError, match=re.escape(
        f"workdir {tmp_path} is in use by another run (pid {holder.pid} on host "
        f"{socket.gethostname()}, started ")):
      train_and_evaluate(tiny_config(num_steps=2), str(tmp_path), quiet=True)
    assert not os.path.exists(tmp_path / "checkpoints")
  finally:
    holder.kill()  # SIGKILL: the kernel drops its lock; the file (a stale lock) stays
    holder.wait()
  assert json.load(open(tmp_path / workdir_lib.LOCK_FILE))["pid"] == holder.pid
  out = train_and_evaluate(tiny_config(num_steps=2), str(tmp_path), quiet=True)
  assert out["step"] == 2
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)  # released on exit


def test_lock_is_released_when_the_run_fails(tmp_path, monkeypatch):
  def boom(*a, **k):
    raise KeyboardInterrupt("killed")

  monkeypatch.setattr(train_lib, "write_config", boom)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(tiny_config(num_steps=2), str(tmp_path), quiet=True)
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)
  with workdir_lib.WorkdirLock(str(tmp_path)):  # free again
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {os.getpid()}"):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_lock_without_flock_decides_by_pid_and_host(tmp_path, monkeypatch):
  """Where the filesystem has no flock, a live pid on this host holds the lock, a dead one is
  stale, and another host's lock is refused with how to clear it."""
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
  path = tmp_path / workdir_lib.LOCK_FILE
  host = socket.gethostname()
  dead = subprocess.Popen(["true"])
  dead.wait()
  path.write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "earlier"}))
  busy = workdir_lib.WorkdirBusy
  with pytest.raises(busy, match=re.escape(f"pid {os.getppid()} on host {host}")):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  path.write_text(json.dumps({"pid": 12345, "host": "elsewhere", "started": "earlier"}))
  with pytest.raises(busy, match=re.escape(f"if that run is gone, delete {path}")):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  path.write_text(json.dumps({"pid": dead.pid, "host": host, "started": "earlier"}))
  lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert lock.stale_holder["pid"] == dead.pid
  assert json.load(open(path))["pid"] == os.getpid()
  lock.release()
  assert not path.exists()


# ---- 3, 9. nonsense settings are refused before anything runs ----

@pytest.mark.parametrize("key,value,msg", [
    ("train.keep_checkpoints", 0, r"train.keep_checkpoints=0 must be >= 1"),
    ("data.batch_size", 0, r"data.batch_size=0 must be >= 1"),
    ("train.log_every", 0, r"train.log_every=0 must be >= 1"),
    ("train.num_steps", -5, r"train.num_steps=-5 must be >= 1"),
    ("train.eval_every", -1, r"train.eval_every=-1 must be >= 0"),
    ("train.ckpt_every", -4, r"train.ckpt_every=-4 must be >= 0"),
    ("train.time_budget_s", -1.0, r"train.time_budget_s=-1.0 must be >= 0"),
    ("train.stop_at_accuracy", 1.5, r"train.stop_at_accuracy=1.5 must be in \[0, 1\]"),
    ("data.seq_len", 0, r"data.seq_len=0 must be >= 2"),
    ("data.eval_examples", 0, r"data.eval_examples=0 must be >= 1"),
    ("opt.grad_accum", 0, r"opt.grad_accum=0 must be >= 1"),
    ("opt.grad_accum", 3, r"data.batch_size=8 is not divisible by opt.grad_accum=3"),
    ("model.num_layers", 0, r"model.num_layers=0 must be >= 1"),
])
def test_nonsense_settings_are_refused_up_front(tmp_path, monkeypatch, key, value, msg):
  cfg = tiny_config()
  cfg.unlock()
  section, name = key.split(".")
  cfg[section][name] = value
  cfg.lock()

  def no_data(*a, **k):
    raise AssertionError("the config must be refused before data is read")

  monkeypatch.setattr(train_lib, "make_source", no_data)
  with pytest.raises(ValueError, match=msg) as e:
    train_and_evaluate(cfg, str(tmp_path / "w"), quiet=True)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w")
  with pytest.raises(ValueError, match="workdir is empty"):
    train_and_evaluate(tiny_config(), "", quiet=True)


# ---- 4. a finished run stays finished ----

def test_finished_runs_stay_finished_unless_continued(tmp_path):
  # Stopped by the time budget at step 1: a rerun does not train on (it used to add a step).
  cfg = tiny_config(num_steps=50, eval_every=0, time_budget_s=1e-3)
  first = train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert first["step"] == 1 and first["out_of_time"]
  rec = json.load(open(tmp_path / workdir_lib.FINISHED_FILE))
  assert (rec["reason"], rec["step"], rec["checkpoint_step"]) == ("time_budget", 1, 1)
  metrics_before = open(tmp_path / "metrics.jsonl").read()
  again = train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert again["already_finished"] and again["finish_reason"] == "time_budget"
  assert again["step"] == 1 and again["eval/accuracy"] == first["eval/accuracy"]
  assert step_dirs(tmp_path) == [1]
  assert open(tmp_path / "metrics.jsonl").read() == metrics_before
  # Asked to go on: one more budget's worth (one step).
  cont = tiny_config(num_steps=50, eval_every=0, time_budget_s=1e-3, continue_finished=True)
  out = train_and_evaluate(cont, str(tmp_path), quiet=True)
  assert out["step"] == 2 and not out.get("already_finished")
  assert step_dirs(tmp_path) == [1, 2]
  assert json.load(open(tmp_path / workdir_lib.FINISHED_FILE))["step"] == 2


def test_stop_at_accuracy_run_stays_stopped(tmp_path):
  # Any eval accuracy above 0 stops this run early: with 34 tokens, some answers are right by chance.
  cfg = tiny_config(num_steps=12, eval_every=2, stop_at_accuracy=1e-6)
  cfg.unlock(); cfg.data.vocab_size = 34; cfg.lock()
  first = train_and_evaluate(cfg, str(tmp_path), quiet=True)
  stop = first["step"]
  assert first["stopped_early"] and stop < 12
  again = train_and_evaluate(cfg, str(tmp_path), quiet=True)  # used to train on past the stop
  assert again["already_finished"] and again["finish_reason"] == "stop_at_accuracy"
  assert again["step"] == stop and again["eval/accuracy"] == first["eval/accuracy"]
  assert step_dirs(tmp_path)[-1] == stop
  assert max(r["step"] for r in rows(tmp_path)) == stop


def test_reached_num_steps_extends_only_when_asked(tmp_path):
  cfg = tiny_config(num_steps=4)
  train_and_evaluate(cfg, str(tmp_path), quiet=True)
  again = train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert again["already_finished"] and again["finish_reason"] == "num_steps" and again["step"] == 4
  out = train_and_evaluate(tiny_config(num_steps=6), str(tmp_path), quiet=True)
  assert out["step"] == 6 and step_dirs(tmp_path) == [4, 6]


# ---- 7. non-finite and zero gradients ----

def nan_gradient(loss_fn):
  """`loss_fn` plus 0 * sqrt(0): the same finite loss, with a NaN gradient."""
  def patched(logits_BTV, targets_BT):
    loss, n = loss_fn(logits_BTV, targets_BT)
    return loss + 0.0 * jnp.sqrt(jnp.sum(logits_BTV) * 0.0), n
  return patched


def test_nonfinite_stop_names_the_gradient_norm_and_stays_finished(tmp_path, monkeypatch):
  real = step_lib.cross_entropy
  monkeypatch.setattr(step_lib, "cross_entropy", nan_gradient(real))
  cfg = tiny_config(num_steps=4)
  with pytest.raises(TrainingError, match=r"non-finite grad_norm at step 1 \(loss=\d\.\d+, "
                     r"grad_norm=nan\)"):
    train_and_evaluate(cfg, str(tmp_path), quiet=True)
  rec = json.load(open(tmp_path / workdir_lib.FINISHED_FILE))
  assert (rec["reason"], rec["step"], rec["checkpoint_step"]) == ("non_finite", 1, 0)
  monkeypatch.setattr(step_lib, "cross_entropy", real)
  with pytest.raises(TrainingError, match=r"finished at step 1 \(non_finite\).*continue_finished"):
    train_and_evaluate(cfg, str(tmp_path), quiet=True)
  cont = tiny_config(num_steps=4, continue_finished=True)
  assert train_and_evaluate(cont, str(tmp_path), quiet=True)["step"] == 4


def test_nonfinite_step_is_never_checkpointed(tmp_path):
  """The step that turns the weights non-finite is a checkpoint step: it must not be saved."""
  cfg = tiny_config(num_steps=6, ckpt_every=1, eval_every=0)
  cfg.unlock(); cfg.opt.lr = 1e30; cfg.opt.clip_norm = 1e30; cfg.lock()
  with pytest.raises(TrainingError, match=r"non-finite (loss|grad_norm) at step \d+") as e:
    train_and_evaluate(cfg, str(tmp_path), quiet=True)
  bad = int(str(e.value).split("at step ")[1].split()[0])
  assert bad >= 2 and step_dirs(tmp_path) == list(range(1, bad))[-3:]
  assert readable_steps(tmp_path, cfg) == step_dirs(tmp_path)  # all finite


def test_skipped_steps_are_counted_not_written_as_nan(tmp_path, monkeypatch):
  monkeypatch.setattr(step_lib, "cross_entropy", nan_gradient(step_lib.cross_entropy))
  out = train_and_evaluate(tiny_config(num_steps=3, skip_nonfinite=True, eval_every=0),
                           str(tmp_path), quiet=True)
  text = open(tmp_path / "metrics.jsonl").read()
  assert "NaN" not in text and "Infinity" not in text
  train_rows = [r for r in rows(tmp_path) if "train/lr" in r]
  assert [r["train/skipped_steps"] for r in train_rows] == [1, 2, 3]
  assert all("train/grad_norm" not in r and np.isfinite(r["train/loss"]) for r in train_rows)
  assert out["skipped_steps"] == 3


def test_zero_gradient_norm_is_flagged(tmp_path, monkeypatch):
  real = step_lib.cross_entropy
  monkeypatch.setattr(step_lib, "cross_entropy",
                      lambda l, t: tuple(jax.lax.stop_gradient(x) for x in real(l, t)))
  with pytest.warns(UserWarning, match=r"gradient norm was exactly 0 in 3 logged steps in a row "
                    r"\(through step 3; train/loss \d\.\d+, ln\(vocab_size\) 5\.5452\)"):
    train_and_evaluate(tiny_config(num_steps=4, eval_every=0), str(tmp_path), quiet=True)
  train_rows = [r for r in rows(tmp_path) if "train/lr" in r]
  assert [r["train/zero_grad_steps"] for r in train_rows] == [1, 2, 3, 4]
  assert all(r["train/grad_norm"] == 0.0 for r in train_rows)


def test_a_metrics_row_cut_short_by_a_kill_is_skipped(tmp_path):
  from memarch.metrics import MetricWriter
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')  # killed mid-write
  w = MetricWriter(str(tmp_path), tensorboard=False)  # the resumed run appends
  w.write(2, {"train/loss": 1.5})
  w.close()
  with pytest.warns(UserWarning, match=r"skipped 1 unreadable row\(s\) \(line 2\)"):
    got = read_metrics(str(path))
  assert got == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]


def test_a_damaged_config_json_is_one_line(tmp_path):
  train_and_evaluate(tiny_config(num_steps=2), str(tmp_path), quiet=True)
  (tmp_path / "config.json").write_text('{"model": {"d_mod')  # cut short
  with pytest.raises(TrainingError, match=r"config.json is unreadable .* restore that file or use "
                     r"a new --workdir"):
    train_and_evaluate(tiny_config(num_steps=2), str(tmp_path), quiet=True)


def test_full_disk_while_writing_metrics_is_one_line(tmp_path, monkeypatch):
  from memarch import metrics as metrics_lib

  def full(self, step, metrics):
    raise OSError(errno.ENOSPC, "No space left on device", self.path)

  monkeypatch.setattr(metrics_lib.MetricWriter, "write", full)
  with pytest.raises(TrainingError, match=r"could not write .*metrics.jsonl: No space left on "
                     r"device; free disk space or fix permissions, then rerun") as e:
    train_and_evaluate(tiny_config(num_steps=2), str(tmp_path), quiet=True)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / workdir_lib.LOCK_FILE)
