"""scripts/eval.py's runner end to end on tiny trained workdirs, the MQAR sweep, and clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memarch import configs_lib
from memarch.evals import mqar_sweep, runner
from memarch.evals.runner import EvalError
from memarch.train import train_and_evaluate

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _tiny(c, steps=2):
  c.unlock()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 16, 1, 2
  c.data.batch_size = 4
  c.train.update(dict(num_steps=steps, log_every=1, eval_every=0, ckpt_every=0, progress=False,
                      stop_at_accuracy=0.0, stats_every=0))
  c.opt.warmup_steps = 1
  c.mesh.num_devices = 1  # batch 4 does not split over the 8 test devices
  c.lock()
  return c


# One worker runs this module, so its module-scoped fixture is built once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("runner")


@pytest.fixture(scope="module")
def babilong_workdir(tmp_path_factory):
  cfg = configs_lib.load_config(
      os.path.join(ROOT, "configs/babilong.py:arch=transformer,seq_len=128,tasks=qa1+qa4"))
  wd = str(tmp_path_factory.mktemp("babilong"))
  train_and_evaluate(_tiny(cfg), wd, quiet=True)
  return wd


def test_eval_end_to_end_writes_json_and_png(babilong_workdir):
  out = runner.run_evals(babilong_workdir, "babilong,passkey,niah", lengths=[340],
                         depths=[0.0, 1.0], tasks=["qa1", "qa4"], num_examples=2, segment_len=16,
                         batch_size=2, log=lambda m: None)
  assert sorted(out) == ["babilong", "niah", "passkey"]
  for name in out:
    for kind in ("json", "png"):
      path = os.path.join(babilong_workdir, "eval", f"{name}.{kind}")
      assert os.path.getsize(path) > 100, path
  res = json.load(open(os.path.join(babilong_workdir, "eval", "babilong.json")))
  assert res["tasks"] == ["qa1", "qa4"] and res["lengths"] == [340] and res["step"] == 2
  accs = [res["accuracy"][t]["340"] for t in res["tasks"]]
  assert all(a in (0.0, 0.5, 1.0) for a in accs)  # 2 examples per cell
  assert res["mean"]["340"] == pytest.approx(np.mean(accs))
  assert "restricted argmax" in res["metric"]
  pk = json.load(open(os.path.join(babilong_workdir, "eval", "passkey.json")))
  assert set(pk["accuracy"]) == {"0.0", "1.0"} and set(pk["accuracy"]["0.0"]) == {"340"}
  niah = json.load(open(os.path.join(babilong_workdir, "eval", "niah.json")))
  assert 0.0 <= niah["score"]["1.0"]["340"] <= 100.0


def test_eval_errors(babilong_workdir, tmp_path):
  with pytest.raises(EvalError, match="unknown eval 'babilon'"):
    runner.run_evals(babilong_workdir, "babilon")
  with pytest.raises(EvalError, match="does not exist"):
    runner.run_evals(str(tmp_path / "nowhere"), "babilong")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(EvalError, match="no checkpoint"):
    runner.run_evals(str(tmp_path / "empty"), "babilong")
  with pytest.raises(EvalError, match="mqar eval needs a model trained on data.name=mqar"):
    runner.run_evals(babilong_workdir, "mqar", log=lambda m: None)
  with pytest.raises(EvalError, match="unknown BABILong task"):
    runner.run_evals(babilong_workdir, "babilong", tasks=["qa9"], log=lambda m: None)
  with pytest.raises(EvalError, match="seq_len:kv"):
    runner.parse_settings("64-4")


def test_eval_script_reports_missing_checkpoint_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/eval.py"),
                         f"--workdir={tmp_path}", "--evals=babilong"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and "config.json" in lines[0], proc.stderr


def test_mqar_micro_sweep_writes_table_and_evals(tmp_path):
  out = mqar_sweep.run_sweep(["transformer"], [(16, 2)], [16], [3e-3], str(tmp_path), max_steps=3,
                             batch_size=4, eval_examples=8, log=lambda m: None)
  for kind in ("json", "md", "png"):
    assert os.path.getsize(out["paths"][kind]) > 100
  (row,) = out["best"]
  assert (row["config"], row["seq_len"], row["num_kv_pairs"], row["d_model"]) == ("transformer", 16,
                                                                                   2, 16)
  assert row["steps"] == 3 and 0.0 <= row["accuracy"] <= 1.0 and row["wall_sec"] > 0
  # Attention's state: K and V caches of seq_len x d_model float32, plus position bookkeeping.
  assert row["state_bytes_per_layer"] == 2 * 16 * 16 * 4 + 2 * 16 * 4 + 4
  table = open(out["paths"]["md"]).read()
  assert "| transformer | 16 | 2 | 16 |" in table
  # A rerun reads finished runs back instead of training again.
  again = mqar_sweep.run_sweep(["transformer"], [(16, 2)], [16], [3e-3], str(tmp_path),
                               max_steps=3, batch_size=4, eval_examples=8, log=lambda m: None)
  assert again["best"][0]["wall_sec"] == row["wall_sec"]
  # The run's workdir evaluates with the mqar eval (table + plot), at its own and a longer setting.
  res = runner.run_evals(row["workdir"], "mqar", mqar_settings="16:2,32:2", num_examples=8,
                         batch_size=4, segment_len=8, log=lambda m: None)["mqar"]
  rows = res["result"]["rows"]
  assert [(r["seq_len"], r["num_kv_pairs"]) for r in rows] == [(16, 2), (32, 2)]
  assert rows[0]["accuracy"] == pytest.approx(row["accuracy"])  # same test split, same metric
  assert os.path.exists(os.path.join(row["workdir"], "eval", "mqar.md"))
  with pytest.raises(EvalError, match="needs a model trained on text"):
    runner.run_evals(row["workdir"], "babilong", log=lambda m: None)


def test_state_bytes_of_a_recurrent_mixer_do_not_grow_with_length():
  c = mqar_sweep.load_named_config("gated_deltanet")
  short, long = mqar_sweep.state_bytes_per_layer(c, 64), mqar_sweep.state_bytes_per_layer(c, 4096)
  assert short == long and len(short) == c.model.num_layers
  a = mqar_sweep.load_named_config("attention")  # a registry name, not a config file
  assert mqar_sweep.state_bytes_per_layer(a, 128)[0] > mqar_sweep.state_bytes_per_layer(a, 64)[0]
  with pytest.raises(ValueError, match="unknown config"):
    mqar_sweep.load_named_config("not_an_arch")
