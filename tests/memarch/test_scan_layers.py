"""model.scan_layers (memarch.lm.LM._scan_blocks): the blocks run as a lax.scan over pattern periods
and give the loop's logits, states, sown auxiliary losses and gradients."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from memarch import configs_lib, testing
from memarch import step as step_lib
from memarch.lm import LM
from memarch.sharding import mesh_context


def models(pattern=("mom", "attention")):
  """(loop model, scanned model, step config) with the same parameters: 4 blocks = 2 periods of
  `pattern` (default MoM, which sows a balance loss, and attention)."""
  cfg = configs_lib.load_config(f"{testing.ROOT}/configs/mom.py")
  cfg.unlock()
  cfg.model.update(dict(d_model=32, num_layers=4, num_heads=2, layer_pattern=pattern))
  cfg.model.mixer.attention = {}
  cfg.model.mixer.swa = {"window": 8}
  cfg.lock()
  lm_cfg = configs_lib.lm_config(cfg, 64)
  with mesh_context():
    loop = LM(lm_cfg, rngs=nnx.Rngs(0))
    scanned = LM(dataclasses.replace(lm_cfg, scan_layers=True), rngs=nnx.Rngs(0))
  return loop, scanned, step_lib.StepConfig.from_config(cfg, packed=False)


def close(a, b, tol=1e-5):
  """Equal up to float32 rounding: XLA fuses the scanned body differently from the loop (measured
  max difference 4e-6 on logits of size ~1.5)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_scanned_equals_loop_outputs_states_and_continuation():
  loop, scanned, _ = models(("swa", "attention"))
  tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 48), 0, 64)
  y_ref, s_ref = loop(tokens_BT[:, :32])
  y, s = scanned(tokens_BT[:, :32])
  close(y, y_ref)
  close(s, s_ref)
  # Continuing from a carried state (per-layer states are stacked and unstacked around the scan).
  y2_ref, _ = loop(tokens_BT[:, 32:], state=s_ref)
  y2, _ = scanned(tokens_BT[:, 32:], state=s)
  close(y2, y2_ref)


def test_scanned_equals_loop_loss_aux_and_gradients():
  loop, scanned, step_cfg = models()
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 33), 0, 64)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  def grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: step_lib.loss_fn(nnx.merge(graphdef, p, rest), batch, step_cfg)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (total_ref, m_ref), g_ref = grads(loop)
  (total, m), g = grads(scanned)
  aux = [k for k in m_ref if k.startswith("aux/")]
  assert aux == ["aux/blocks.0.mixer.balance", "aux/blocks.2.mixer.balance"]
  assert sorted(m) == sorted(m_ref)
  close({k: m[k] for k in aux}, {k: m_ref[k] for k in aux})
  assert abs(float(total) - float(total_ref)) < 1e-6
  close(g, g_ref)


def test_scan_layers_needs_whole_periods():
  _, scanned, _ = models()
  with pytest.raises(ValueError, match="multiple of the layer pattern's period 2"):
    dataclasses.replace(scanned.cfg, num_layers=3)


@pytest.mark.slow  # the checkpoint layout; scanned == loop: the tests above
def test_loop_checkpoint_resumes_scanned(tmp_path):
  """Parameters are stored per block in both forms, so a loop-form checkpoint resumes with
  scan_layers=True and continues the loop run's losses (to float32 rounding)."""
  import os

  from memarch.metrics import read_metrics
  from memarch.train import train_and_evaluate

  def losses(workdir):
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

  def config(scan):
    c = testing.tiny_config(num_steps=8, eval_every=0)
    c.unlock()
    c.model.num_layers = 2
    c.model.scan_layers = scan
    c.lock()
    return c

  train_and_evaluate(config(False), str(tmp_path / "loop"), quiet=True)
  train_and_evaluate(config(False), str(tmp_path / "mixed"), quiet=True, max_steps_this_run=4)
  out = train_and_evaluate(config(True), str(tmp_path / "mixed"), quiet=True)
  assert out["step"] == 8
  ref, got = losses(tmp_path / "loop"), losses(tmp_path / "mixed")
  assert sorted(got) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(5, 9)], [ref[s] for s in range(5, 9)],
                             rtol=1e-5)
  assert got[8] < got[1] - 0.05  # it trained on from the checkpoint, not from scratch
