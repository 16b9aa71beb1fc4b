"""PEER (arXiv:2407.04153): equals a Python loop over tokens, heads and brute-force-selected experts;
per-token (no batch mixing); custom-VJP gradients equal autodiff of the naive gather; usage stats."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.base import Stat
from layers.mlp import SwiGLU, SwiGLUConfig
from layers.peer import PEER, PEERConfig
from memarch.sharding import mesh_context
from pallas_kernels.testing import assert_tree_close

D = 12
CFG = PEERConfig(D, num_subkeys=5, num_heads=3, top_k=4, d_key=8)


apply = nnx.jit(lambda m, x: m(x))


def make(cfg=CFG, seed=0):
  with mesh_context():
    return PEER(cfg, rngs=nnx.Rngs(seed))


def _norm(q, kind, eps=1e-6):
  if kind == "none":
    return q
  if kind == "layernorm":
    q = q - q.mean()
  return q / np.sqrt(np.mean(q * q) + eps)


def _gelu(z):
  from math import erf, sqrt
  return 0.5 * z * (1 + erf(z / sqrt(2)))


def naive_peer(layer, x_BTD):
  """Python loop: explicit concatenated keys [c_a; c'_b], brute-force top-k, softmax, experts."""
  cfg = layer.cfg
  wq = np.asarray(layer.w_query[...], np.float64)
  keys = np.asarray(layer.sub_keys[...], np.float64)
  u = np.asarray(layer.down[...], np.float64)
  v = np.asarray(layer.up[...], np.float64)
  n, half = cfg.num_subkeys, cfg.dk // 2
  x = np.asarray(x_BTD, np.float64)
  y = np.zeros_like(x)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for h in range(cfg.num_heads):
        q = x[b, t] @ wq[:, h, :]
        q = np.concatenate([_norm(q[:half], cfg.query_norm), _norm(q[half:], cfg.query_norm)])
        ka, kb = (keys[0], keys[1]) if cfg.shared_subkeys else (keys[h, 0], keys[h, 1])
        full_keys = np.stack([np.concatenate([ka[i], kb[j]]) for i in range(n) for j in range(n)])
        s = full_keys @ q
        top = np.argsort(-s)[:cfg.top_k]
        g = np.exp(s[top] - s[top].max())
        g /= g.sum()
        for gj, e in zip(g, top):
          y[b, t] += gj * _gelu(u[e] @ x[b, t]) * v[e]
  return y


@pytest.mark.parametrize("shared,norm", [(True, "layernorm"), (False, "rmsnorm"), (True, "none")])
def test_equals_python_loop_over_selected_experts(shared, norm):
  cfg = dataclasses.replace(CFG, shared_subkeys=shared, query_norm=norm)
  layer = make(cfg)
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, D), jnp.float64)
    y = apply(layer, x)
    assert y.dtype == jnp.float64 and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), naive_peer(layer, x), rtol=1e-10, atol=1e-12)


def test_per_token_no_batch_or_future_mixing():
  layer = make()
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 7, D))
  y = apply(layer, x)
  x2 = x.at[:, 4:].set(jax.random.normal(jax.random.PRNGKey(3), (3, 3, D))).at[1:].multiply(5.0)
  y2 = apply(layer, x2)
  np.testing.assert_array_equal(y[0, :4], y2[0, :4])  # later tokens and other examples changed
  assert not np.allclose(y[0, 4:], y2[0, 4:])


def test_gradients_equal_naive_gather_autodiff():
  """End to end (W_q, sub-keys, U, V, x): custom-VJP `xla` path vs autodiff of take + einsum."""
  layer_x = make(dataclasses.replace(CFG, implementation="xla", chunk_size=7))
  layer_r = make(dataclasses.replace(CFG, implementation="reference"))
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, D))
  ct = jax.random.normal(jax.random.PRNGKey(5), (2, 5, D))

  def grads(layer):
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(params, x):
      return jnp.sum(nnx.merge(graphdef, params)(x) * ct)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  gx, gr = grads(layer_x), grads(layer_r)
  for g in jax.tree.leaves(gx):
    assert np.all(np.isfinite(g)) and np.any(g != 0)
  assert_tree_close(gx, gr, 1e-5, "PEER grads")


def test_usage_stats_sown_under_capture():
  cfg = dataclasses.replace(CFG, num_heads=1, top_k=2)
  layer = make(cfg)
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 4, D))
  y, sown = nnx.capture(layer, Stat)(x)
  _, idx, g = layer.route(x)
  hit = len(np.unique(np.asarray(idx)))
  stats = {path[0].key: float(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]}
  assert set(stats) == {"expert_usage", "usage_entropy", "usage_unevenness"}
  usage = stats["expert_usage"]
  assert usage == pytest.approx(hit / cfg.num_experts)
  mass = np.zeros(cfg.num_experts)
  np.add.at(mass, np.asarray(idx).reshape(-1), np.asarray(g).reshape(-1))
  z = mass[mass > 0] / mass.sum()
  entropy = -(z * np.log(z)).sum()
  assert stats["usage_entropy"] == pytest.approx(entropy, rel=1e-5)
  assert stats["usage_unevenness"] == pytest.approx(np.log(cfg.num_experts) - entropy, rel=1e-5)
  np.testing.assert_array_equal(y, layer(x))  # capture does not change the output


def test_init_output_std_near_swiglu():
  cfg = PEERConfig(64, num_subkeys=16, num_heads=4, top_k=8)
  layer = make(cfg)
  with mesh_context():
    ffn = SwiGLU(SwiGLUConfig(64), rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 64, 64))
  ratio = float(jnp.std(apply(layer, x)) / jnp.std(apply(ffn, x)))
  assert 0.7 < ratio < 1.4, ratio


def test_rejects_batchnorm_and_bad_k():
  with pytest.raises(ValueError, match="BatchNorm"):
    PEERConfig(8, query_norm="batchnorm")
  with pytest.raises(ValueError):
    PEERConfig(8, num_subkeys=2, top_k=5)
