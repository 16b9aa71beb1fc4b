"""Sharding on 8 CPU devices: parameters and optimizer moments follow the logical-axis rules, and a
sharded training run equals an unsharded one."""
import os

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from memarch import configs_lib, sharding
from memarch.lm import LM, LMConfig
from memarch.metrics import read_metrics
from memarch.train import train_and_evaluate

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_params_and_optimizer_state_follow_rules():
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh(2, 2, 2)
  with sharding.mesh_context(mesh):
    model = LM(LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  blk = model.blocks[0]
  assert blk.channel.w_gate[...].sharding.spec == P("fsdp", "tensor")
  assert blk.channel.w_down[...].sharding.spec == P("tensor", "fsdp")
  assert blk.mixer.wq[...].sharding.spec == P("fsdp", "tensor", None)
  assert model.embed[...].sharding.spec == P("tensor", "fsdp")
  params = nnx.state(model, nnx.Param)
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  checked = 0
  for moment in ("mu", "nu"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(opt))[0]:
      keys = [getattr(k, "key", None) for k in path]
      if moment not in keys:
        continue
      i = keys.index(moment)
      ppath = tuple(path[i + 1:])
      match = [v for k, v in flat_p.items() if tuple(k) == ppath]
      if match:
        assert leaf.sharding.spec == match[0].sharding.spec, (keys, leaf.sharding, match[0].sharding)
        checked += 1
  assert checked >= 2 * len(flat_p)


def _cfg(**mesh):
  c = configs_lib.load_config(os.path.join(ROOT, "configs/transformer.py"))
  c.unlock()
  c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.data.batch_size, c.data.seq_len, c.data.eval_examples = 8, 32, 16
  c.train.update(dict(num_steps=4, log_every=1, eval_every=4, ckpt_every=0, progress=False,
                      stop_at_accuracy=0.0))
  c.mesh.update(mesh)
  c.lock()
  return c


def test_sharded_run_equals_unsharded(tmp_path):
  train_and_evaluate(_cfg(num_devices=1), str(tmp_path / "one"), quiet=True)
  train_and_evaluate(_cfg(data=2, fsdp=2, tensor=2), str(tmp_path / "eight"), quiet=True)
  a = read_metrics(str(tmp_path / "one" / "metrics.jsonl"))
  b = read_metrics(str(tmp_path / "eight" / "metrics.jsonl"))
  la = [r["train/loss"] for r in a if "train/loss" in r]
  lb = [r["train/loss"] for r in b if "train/loss" in r]
  assert len(la) == len(lb) == 4
  np.testing.assert_allclose(la, lb, rtol=2e-5)
