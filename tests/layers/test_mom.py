"""MoM: reduction to Gated DeltaNet, the balance loss, nothing dropped by routing."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.deltanet import GatedDeltaNet, GatedDeltaNetConfig
from layers.mom import MoM, MoMConfig, balance_loss
from memarch.sharding import mesh_context

D, H = 16, 2


def test_one_memory_top1_no_shared_equals_gated_deltanet():
  with mesh_context():
    mom = MoM(MoMConfig(D, H, num_memories=1, top_k=1, shared_memory=False, chunk_size=4),
              rngs=nnx.Rngs(0))
    gdn = GatedDeltaNet(GatedDeltaNetConfig(D, H, chunk_size=4), rngs=nnx.Rngs(1))
  # Copy MoM's weights into the GDN layer.
  gdn.wq[...] = mom.wq[...]
  gdn.wk[...] = mom.wk[...][0]
  gdn.wv[...] = mom.wv[...][0]
  gdn.wb[...] = mom.wb[...][0]
  gdn.wa[...] = mom.wa[...][0]
  for name in ("A_log", "dt_bias"):
    getattr(gdn, name)[...] = getattr(mom, name)[...]
  for name in ("conv_q", "conv_k", "conv_v"):
    getattr(gdn, name).weight[...] = getattr(mom, name).weight[...]
  for name in ("w_gate", "scale", "wo"):
    getattr(gdn.out, name)[...] = getattr(mom.out, name)[...]
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, D))
  y_mom, s_mom = mom(x)
  y_gdn, s_gdn = gdn(x)
  np.testing.assert_allclose(y_mom, y_gdn, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_mom["S"][:, 0], s_gdn["S"], rtol=1e-5, atol=1e-6)


def test_balance_loss_is_k_when_uniform_and_larger_when_skewed():
  m, k, n = 4, 2, 8
  probs = jnp.full((n, m), 1 / m)
  idx = jnp.array([[i % m, (i + 1) % m] for i in range(n)])
  assert float(balance_loss(probs, idx, m)) == 2.0
  skew_p = jnp.tile(jnp.array([[0.7, 0.2, 0.05, 0.05]]), (n, 1))
  skew_i = jnp.tile(jnp.array([[0, 1]]), (n, 1))
  assert float(balance_loss(skew_p, skew_i, m)) > 3.0


def test_every_routed_token_is_processed():
  """Even when all tokens pick the same memories (worst imbalance) none are dropped: zeroing every
  memory's value projection except one changes the output at every position."""
  with mesh_context():
    mom = MoM(MoMConfig(D, H, num_memories=4, top_k=1, shared_memory=False, chunk_size=4),
              rngs=nnx.Rngs(0))
  mom.router[...] = jnp.zeros_like(mom.router[...]).at[:, 2].set(0.0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, D))
  probs = jax.nn.softmax(x @ mom.router[...], -1)
  assert np.allclose(probs, 0.25)  # ties: top-1 is memory 0 for every token
  y0, _ = mom(x)
  mom.wv[...] = mom.wv[...].at[0].set(0.0)
  y1, _ = mom(x)
  diff = np.abs(np.asarray(y0 - y1)).max(-1)
  assert np.all(diff > 1e-6), diff
