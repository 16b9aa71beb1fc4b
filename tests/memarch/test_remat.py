"""Rematerialisation (model.remat, docs/design.md "Precision and memory at scale"): recomputing each
block in the backward pass changes neither the loss nor any gradient, and values sown inside the
rematerialised block still reach the training step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memarch import configs_lib, testing
from memarch import step as step_lib
from memarch.lm import LM
from memarch.sharding import mesh_context

# (config, policies): attention under both; the Titans memory (its chunked op has its own custom
# VJP inside the remat, and the layer sows statistics) under 'full', linear (depth 1) to keep the
# compile short.
CASES = {"transformer": ("configs/transformer.py", ("dots", "full")),
         "titans_lmm": ("configs/titans.py:variant=lmm,depth=1", ("full",))}


def loss_and_grads(spec: str, remat: str):
  cfg = configs_lib.load_config(f"{testing.ROOT}/{spec}")
  cfg.unlock()
  cfg.model.update(dict(d_model=32, num_layers=1, num_heads=2, remat=remat))
  cfg.lock()
  with mesh_context():
    model = LM(configs_lib.lm_config(cfg, 64), rngs=nnx.Rngs(0))
  step_cfg = step_lib.StepConfig.from_config(cfg, packed=False)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 33), 0, 64)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    return step_lib.loss_fn(nnx.merge(graphdef, params, rest), batch, step_cfg,
                            collect_stats=True)

  (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return float(total), metrics, jax.tree.leaves(grads)


@pytest.mark.parametrize("name", list(CASES))
def test_remat_keeps_loss_and_gradients(name):
  spec, policies = CASES[name]
  ref_loss, ref_metrics, ref_grads = loss_and_grads(spec, "none")
  for policy in policies:
    got_loss, got_metrics, got_grads = loss_and_grads(spec, policy)
    assert abs(got_loss - ref_loss) < 1e-6, (policy, got_loss, ref_loss)
    assert sorted(got_metrics) == sorted(ref_metrics)  # sown values still collected
    for k in ref_metrics:
      np.testing.assert_allclose(got_metrics[k], ref_metrics[k], rtol=1e-6, err_msg=k)
    for a, b in zip(got_grads, ref_grads, strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6,
                                 err_msg=f"{name} {policy}")
  if name == "titans_lmm":
    assert any(k.startswith("stats/") for k in ref_metrics)
  assert max(float(jnp.max(jnp.abs(g))) for g in ref_grads) > 1e-3  # gradients are not all ~0
