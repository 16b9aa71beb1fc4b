"""product_key_topk equals brute-force top-k over all n_a * n_b product-key scores
(docs/architectures/peer.md): scores close, index sets equal, k = 1 .. n, batched heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layers.routing import product_key_topk, topk, usage_stats


def brute_force(q_a, q_b, keys_a, keys_b, k):
  """Scores of every explicitly concatenated key [keys_a[a]; keys_b[b]], row-major index a*n_b + b."""
  n_a, n_b = keys_a.shape[0], keys_b.shape[0]
  full = np.concatenate([np.repeat(keys_a, n_b, 0), np.tile(keys_b, (n_a, 1))], axis=1)
  q = np.concatenate([q_a, q_b], axis=-1)
  s = q @ full.T
  idx = np.argsort(-s, axis=-1)[..., :k]
  return np.take_along_axis(s, idx, -1), idx


@settings(max_examples=25, deadline=None)
@given(n_a=st.integers(1, 7), n_b=st.integers(1, 7), d_a=st.integers(1, 4), d_b=st.integers(1, 4),
       lead=st.sampled_from([(), (3,), (2, 3)]), k_frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_matches_brute_force(n_a, n_b, d_a, d_b, lead, k_frac, seed):
  k = max(1, int(round(k_frac * n_a * n_b)))
  rng = np.random.default_rng(seed)
  q_a, q_b = rng.standard_normal((*lead, d_a)), rng.standard_normal((*lead, d_b))
  keys_a, keys_b = rng.standard_normal((n_a, d_a)), rng.standard_normal((n_b, d_b))
  with jax.enable_x64(True):
    scores, idx = product_key_topk(*(jnp.asarray(a) for a in (q_a, q_b, keys_a, keys_b)), k)
  want_s, want_i = brute_force(q_a, q_b, keys_a, keys_b, k)
  assert scores.shape == (*lead, k) and idx.dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(scores), want_s, rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(want_i, -1))


@pytest.mark.parametrize("k", [1, 4, 16])
def test_float32_heads_k_up_to_n(k):
  """h = 3 heads x 5 tokens, n = 4 sub-keys per half, k from 1 to n^2 (every key)."""
  key = jax.random.PRNGKey(k)
  q_a, q_b = jax.random.normal(key, (2, 5, 3, 6))
  ka, kb = jax.random.normal(jax.random.PRNGKey(99), (2, 4, 6))
  scores, idx = product_key_topk(q_a, q_b, ka, kb, k)
  want_s, want_i = brute_force(*(np.asarray(a, np.float64) for a in (q_a, q_b, ka, kb)), k)
  np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(want_i, -1))
  assert np.all(np.diff(np.asarray(scores), axis=-1) <= 0)


def test_gradients_flow_through_selected_scores_only():
  q_a, q_b = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  ka, kb = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4))
  g = jax.grad(lambda ka: product_key_topk(q_a, q_b, ka, kb, 2)[0].sum())(ka)
  _, idx = product_key_topk(q_a, q_b, ka, kb, 2)
  rows = set((np.asarray(idx) // 5).tolist())
  for a in range(5):
    assert np.any(g[a] != 0) == (a in rows)
    if a in rows:  # d(q_a . ka[a]) / d ka[a] = q_a, once per selected key on row a
      mult = int(np.sum(np.asarray(idx) // 5 == a))
      np.testing.assert_allclose(g[a], mult * q_a, rtol=1e-6)


def test_topk_and_usage_stats():
  v, i = topk(jnp.array([[0.1, 3.0, -1.0, 2.0]]), 2)
  np.testing.assert_array_equal(i, [[1, 3]])
  np.testing.assert_allclose(v, [[3.0, 2.0]])
  with pytest.raises(ValueError):
    topk(jnp.zeros((2, 3)), 4)
  stats = usage_stats(jnp.array([[0, 1], [1, 1]]), jnp.array([[0.5, 0.5], [0.25, 0.75]]), 4)
  z = np.array([0.25, 0.75])
  assert float(stats["usage"]) == 0.5
  np.testing.assert_allclose(stats["entropy"], -(z * np.log(z)).sum(), rtol=1e-6)
  np.testing.assert_allclose(stats["unevenness"], np.log(4) + (z * np.log(z)).sum(), rtol=1e-6)
