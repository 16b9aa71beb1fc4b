"""Bad input to scripts/train.py, eval.py and sample.py, run as a user would (subprocesses): each gets
exactly one line, `error: ...`, on stderr and exit status 2, with no traceback (docs/cli_errors.md).

The flag and config cases fail before jax is imported (well under a second each); the cases that need
a trained model share one tiny Shakespeare workdir trained in this process.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(ROOT, "configs")
# A tiny transformer, so that if a case were accepted it would finish quickly instead of training.
TINY = ["--config.model.d_model=16", "--config.model.num_layers=1", "--config.train.num_steps=1",
        "--config.data.batch_size=8", "--config.mesh.num_devices=1", "--config.train.progress=False"]


def run_script(script, *args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def assert_one_error(r, line):
  """Exit status 2, stderr is exactly `line`, and no traceback anywhere."""
  assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
  assert [l for l in r.stderr.splitlines() if l.strip()] == [line], r.stderr[-3000:]
  assert r.returncode == 2, r.returncode
