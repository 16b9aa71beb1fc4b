"""Multi-host training: each process loads only its rows of a batch, and 2 processes x 4 CPU devices
train exactly as 1 process x 8 devices (the launch a GPU cluster or TPU pod slice uses, on localhost)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from memarch import configs_lib
from memarch.data import make_source, row_range

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def small_source(spec, **data):
  c = configs_lib.load_config(os.path.join(ROOT, "configs", spec))
  c.unlock()
  c.data.update(dict(batch_size=8, **data))
  return make_source(c.data, seed=3)


@pytest.mark.parametrize("spec,data", [
    ("transformer.py", {}),
    ("transformer.py:task=text", dict(seq_len=64)),
    ("transformer.py:task=text", dict(seq_len=64, pack=False)),
    ("landmark.py:task=passkey", {}),
    ("babilong.py", {}),
    ("transformer.py", dict(name="memorization", vocab_size=64, seq_len=32)),
])
def test_rows_of_a_batch_are_the_rows_of_the_whole_batch(spec, data):
  source = small_source(spec, **data)
  for step in (0, 7):
    whole = source.batch(step)
    parts = [source.batch(step, rows) for rows in ((0, 3), (3, 4), (4, 8))]
    assert set(whole) == set(parts[0])
    for k, v in whole.items():
      assert [len(p[k]) for p in parts] == [3, 1, 4]
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), v, err_msg=k)


def test_row_range_refuses_rows_outside_the_batch():
  assert row_range(None, 4) == range(4) and row_range((1, 3), 4) == range(1, 3)
  for rows in ((2, 2), (-1, 2), (0, 5)):
    with pytest.raises(ValueError, match="not a non-empty range inside a batch of 4"):
      row_range(rows, 4)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, devices, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       "--xla_cpu_use_fusion_emitters=false")
  args = [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
          f"--config={os.path.join(ROOT, 'configs', 'transformer.py')}", f"--workdir={workdir}",
          "--config.model.d_model=32", "--config.model.num_layers=1",
          "--config.data.batch_size=16", "--config.data.eval_examples=40",
          "--config.train.num_steps=4", "--config.train.log_every=1",
          "--config.train.eval_every=2", "--config.train.ckpt_every=2",
          "--config.train.progress=False", *extra]
  return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def rows_of(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.xdist_group("multihost")
def test_two_processes_train_as_one(tmp_path):
  port = free_port()
  one = launch(tmp_path / "one", 8)
  two = [launch(tmp_path / "two", 4, "--config.mesh.distributed=True",
                f"--config.mesh.coordinator_address=localhost:{port}",
                "--config.mesh.num_processes=2", f"--config.mesh.process_id={i}")
         for i in range(2)]
  outs = []
  for p in (one, *two):
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in (one, *two):
        q.kill()
      raise
    outs.append((p.returncode, err))
  for rc, err in outs:
    assert rc == 0, err[-3000:]
  # Process 0 spoke for the run; process 1 printed nothing and wrote no rows of its own.
  assert "mesh data=8 x fsdp=1 x tensor=1 (8 devices)" in outs[1][1]
  assert "memarch:" not in outs[2][1], outs[2][1][-2000:]
  ref, got = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
  assert [r["step"] for r in got] == [r["step"] for r in ref]
  keys = ("train/loss", "train/grad_norm", "eval/accuracy", "eval/loss")
  for r, g in zip(ref, got):
    for k in keys:
      assert (k in r) == (k in g), (r, g)
      if k in r:
        np.testing.assert_allclose(g[k], r[k], rtol=1e-6, err_msg=f"{k} at step {r['step']}")
  assert sum("eval/accuracy" in r for r in got) == 2
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]


@pytest.mark.parametrize("mesh,message", [
    (dict(distributed=False, coordinator_address="h:1"),
     "mesh.coordinator_address='h:1' is set but mesh.distributed=False"),
    (dict(distributed=True, coordinator_address="h:1", num_processes=2, process_id=2),
     "needs mesh.num_processes >= 1 and 0 <= mesh.process_id < num_processes"),
])
def test_bad_multihost_settings_are_refused(mesh, message):
  from memarch import sharding
  cfg = configs_lib.load_config(os.path.join(ROOT, "configs", "transformer.py")).mesh
  cfg.unlock()
  cfg.update(mesh)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    sharding.maybe_initialize_distributed(cfg)


def test_process_rows_of_one_process_are_the_whole_batch():
  from memarch import sharding
  mesh = sharding.make_mesh(4, 2, 1)
  assert sharding.process_rows(mesh, 16) == (0, 16)
  batch = sharding.global_batch(mesh, {"inputs": np.arange(32).reshape(16, 2)}, 16)
  assert batch["inputs"].sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(sharding.to_host(batch["inputs"]), np.arange(32).reshape(16, 2))
