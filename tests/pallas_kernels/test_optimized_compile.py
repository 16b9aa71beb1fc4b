"""Every op's `xla` path under XLA's full optimisation pipeline equals its token-level reference.

The rest of the suite compiles with `jax_disable_most_optimizations` (tests/conftest.py: faster on
tiny programs). Training compiles with every pass on, and fusion or algebraic simplification can
change what a program computes (reassociated reductions, folded masks), so this module turns the
passes back on and checks outputs and gradients of each op once, in float32 at small shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_delta_rule, linear_attention
from pallas_kernels.block_retrieval_attention import block_retrieval_attention
from pallas_kernels.expert_gather import expert_mlp
from pallas_kernels.testing import assert_close

TOL = 2e-5  # float32, relative RMS
# The memory engine in float32 differs from its reference by up to ~3e-5 in some gradients with
# or without optimisations (Moneta's l_p/l_q maps amplify rounding); 1e-4 still catches a wrong one.
TOL_MEMORY = 1e-4


@pytest.fixture(scope="module", autouse=True)
def optimized():
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  jax.clear_caches()
  yield
  jax.config.update("jax_disable_most_optimizations", old)
  jax.clear_caches()


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _check(f, args, name, tol=TOL):
  """f(*args, impl) -> array: the xla and reference outputs and gradients (of a fixed random
  projection of the output) agree."""
  def outs_and_grads(impl):
    def loss(*a):
      y = f(*a, impl)
      return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))
    return jax.jit(lambda *a: (f(*a, impl), jax.grad(loss, argnums=range(len(a)))(*a)))(*args)

  y, gs = outs_and_grads("xla")
  y_ref, gs_ref = outs_and_grads("reference")
  assert_close(y, y_ref, tol, f"{name} output")
  for i, (g, g_ref) in enumerate(zip(gs, gs_ref)):
    assert_close(g, g_ref, tol, f"{name} grad {i}")


def test_optimisations_are_on():
  assert not jax.config.read("jax_disable_most_optimizations")


def test_gated_delta_rule():
  rng = np.random.default_rng(0)
  B, T, H, K, V = 2, 40, 2, 8, 8
  l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k = l2(_normal(rng, B, T, H, K)), l2(_normal(rng, B, T, H, K))
  v = _normal(rng, B, T, H, V)
  beta = jax.nn.sigmoid(_normal(rng, B, T, H))
  g = jax.nn.log_sigmoid(_normal(rng, B, T, H) + 2.0)
  seg = jnp.asarray(np.repeat([[0, 1, 2, 0]], 10, axis=1).repeat(B, 0), jnp.int32)
  f = lambda q, k, v, beta, g, impl: gated_delta_rule(
      q, k, v, beta, g, segment_ids=seg, chunk_size=16, implementation=impl)[0]
  _check(f, (q, k, v, beta, g), "gated_delta_rule")


def test_linear_attention():
  rng = np.random.default_rng(1)
  B, T, H, K, V = 2, 40, 2, 8, 8
  q, k, v = _normal(rng, B, T, H, K) / 3, _normal(rng, B, T, H, K) / 3, _normal(rng, B, T, H, V)
  g = jax.nn.log_sigmoid(_normal(rng, B, T, H) + 2.0)
  f = lambda q, k, v, g, impl: linear_attention(q, k, v, g, chunk_size=16,
                                                implementation=impl)[0]
  _check(f, (q, k, v, g), "linear_attention")


def test_expert_mlp():
  rng = np.random.default_rng(2)
  T, K, N, E, F = 11, 4, 23, 6, 5
  x, down, up = _normal(rng, T, E), _normal(rng, N, E), _normal(rng, N, F)
  w = _normal(rng, T, K)
  idx = jnp.asarray(rng.integers(0, N, (T, K)), jnp.int32)
  f = lambda x, down, up, w, impl: expert_mlp(x, down, up, idx, w, chunk_size=4,
                                              implementation=impl)
  _check(f, (x, down, up, w), "expert_mlp")


def test_block_retrieval_attention():
  rng = np.random.default_rng(3)
  B, T, H, d, N, C, S = 2, 7, 2, 4, 5, 3, 6
  q, bk, bv = _normal(rng, B, T, H, d), _normal(rng, B, N, C, H, d), _normal(rng, B, N, C, H, d)
  gate = 2.0 * _normal(rng, B, T, 2, N)
  allowed = jnp.asarray(rng.random((B, T, N)) < 0.7)
  kl, vl = _normal(rng, B, S, H, d), _normal(rng, B, S, H, d)
  ml = jnp.asarray(rng.random((B, T, S)) < 0.5)
  f = lambda q, bk, bv, gate, kl, vl, impl: block_retrieval_attention(
      q, bk, bv, gate, allowed, k=2, local=(kl, vl, ml), chunk_size=4, implementation=impl)
  _check(f, (q, bk, bv, gate, kl, vl), "block_retrieval_attention")


@pytest.mark.parametrize("rule", ["titans", pytest.param("moneta", marks=pytest.mark.slow)])
def test_memory(rule):
  """The Titans memory engine (depth 2, momentum, mid-chunk lengths) and a Miras rule on it."""
  from pallas_kernels.miras_memory import init_miras_state, miras_memory
  from pallas_kernels.titans_memory import init_memory_state, titans_memory
  rng = np.random.default_rng(4)
  B, T, H, D, E, L = 2, 20, 2, 8, 2, 2
  l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q, k, v = l2(_normal(rng, B, T, H, D)), l2(_normal(rng, B, T, H, D)), _normal(rng, B, T, H, D)
  theta = 0.3 * jax.nn.sigmoid(_normal(rng, B, T, H, L))
  gate = jax.nn.sigmoid(_normal(rng, B, T, H))
  ln_s, ln_b = 1.0 + 0.2 * _normal(rng, H, D), 0.2 * _normal(rng, H, D)
  w0 = (_normal(rng, H, E * D, D) / np.sqrt(D), _normal(rng, H, D, E * D) / np.sqrt(E * D))
  lengths = jnp.asarray([T, 13], jnp.int32)
  if rule == "titans":
    f = lambda q, k, v, theta, gate, impl: titans_memory(
        q, k, v, theta, 0.9 * gate, jnp.log1p(-0.1 * gate), ln_s, ln_b,
        state=init_memory_state(w0, B), chunk_size=8, lengths=lengths, implementation=impl)[0]
  else:
    f = lambda q, k, v, theta, gate, impl: miras_memory(
        q, k, v, theta, 1.0 - 0.1 * gate, 2.0 + gate, ln_s, ln_b,
        state=init_miras_state(w0, B, "lq"), bias="lp", retention="lq", chunk_size=8,
        lengths=lengths, implementation=impl)[0]
  _check(f, (q, k, v, theta, gate), f"{rule} memory", TOL_MEMORY)
