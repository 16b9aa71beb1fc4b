"""What the loop logs about speed (docs/recipes.md, "Throughput"): tokens per second over real
(non-padding) tokens, MFU against train.peak_flops, profiler traces, and the optional wandb sink."""
import glob
import os
import sys

import jax
import numpy as np
import pytest

from memarch import flops, testing
from memarch.metrics import read_metrics
from memarch.train import _real_tokens, _StepLog, train_and_evaluate


def _metrics(workdir):
  return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]


def test_tokens_per_sec_counts_real_tokens():
  """A batch whose rows are half padding (segment id 0) logs half the slots as tokens."""
  c = testing.tiny_config(num_steps=2)
  seg = np.ones((8, 32), np.int32)
  seg[:, 16:] = 0  # padding
  assert _real_tokens({"segment_ids": seg}) == 8 * 16
  assert _real_tokens({"inputs": seg}) is None
  log = _StepLog(c, end_step=2, lr_at=lambda s: 0.0, t_start=0.0, vocab_size=256, skipped=0,
                 log=print, flops_per_token=1e6, num_devices=1)
  m = {"loss": 1.0, "grad_norm": 1.0, "finite": True, "acc": 0.0, "tokens": 40}
  row = log.check(1, m, _real_tokens({"segment_ids": seg}))
  assert row["train/tokens_per_sec"] / row["train/slot_tokens_per_sec"] == pytest.approx(0.5)
  assert row["train/target_tokens_per_sec"] / row["train/slot_tokens_per_sec"] == pytest.approx(
      40 / 256)
  assert "train/mfu" not in row  # train.peak_flops = 0: not logged


def test_profile_and_mfu(tmp_path):
  """Three steps with train.profile_steps covering step 2: a trace appears in <workdir>/profile/;
  with train.peak_flops set, train/mfu = FLOPs per token x tokens/s / (peak x devices)."""
  c = testing.tiny_config(num_steps=3, eval_every=0, profile_steps="2,2", peak_flops=1e12)
  train_and_evaluate(c, str(tmp_path), quiet=True)
  traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, sorted(glob.glob(str(tmp_path / "profile" / "**"), recursive=True))
  rows = _metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3]
  from flax import nnx

  from memarch import configs_lib
  from memarch.lm import LM
  from memarch.sharding import mesh_context
  lm_cfg = configs_lib.lm_config(c, c.data.vocab_size)
  with mesh_context():
    model = nnx.eval_shape(lambda: LM(lm_cfg, rngs=nnx.Rngs(0)))
  per_token = flops.flops_per_token(lm_cfg, nnx.state(model, nnx.Param), c.data.seq_len).train
  for r in rows:
    # MQAR rows have no padding: every slot is a real token
    assert r["train/tokens_per_sec"] == pytest.approx(r["train/slot_tokens_per_sec"])
    # the peak is per device; the run's mesh takes every device (the suite runs on several CPUs)
    assert r["train/mfu"] == pytest.approx(
        per_token * r["train/tokens_per_sec"] / (1e12 * jax.device_count()), rel=1e-6)


def test_wandb_project_without_the_package_fails_first(tmp_path, monkeypatch):
  """train.wandb_project set but wandb not importable: one clear line before anything is read or
  trained (no metrics file); with the project unset nothing imports wandb."""
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
  c = testing.tiny_config(num_steps=1, wandb_project="memarch-test")
  with pytest.raises(ImportError, match="wandb package is not installed; pip install wandb") as e:
    train_and_evaluate(c, str(tmp_path), quiet=True)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "metrics.jsonl")
  from memarch.metrics import wandb_module
  assert wandb_module("") is None  # unset: wandb is not even imported
