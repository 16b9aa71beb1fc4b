"""Parity of the (gated) linear-attention implementations against the token-loop oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention
from pallas_kernels.testing import assert_close, pallas_modes

NAMES = ("q", "k", "v", "g", "initial_state")


def make_inputs(seed, B, T, H, K, V, dtype, *, gated=True, with_h0=True):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, H, K)) / np.sqrt(K)
  k = rng.standard_normal((B, T, H, K)) / np.sqrt(K)
  v = rng.standard_normal((B, T, H, V))
  g = -np.logaddexp(0.0, -(rng.standard_normal((B, T, H)) + 2.0)) if gated else None
  h0 = rng.standard_normal((B, H, K, V)) if with_h0 else None
  sdt = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          None if g is None else jnp.asarray(g, dtype), None if h0 is None else jnp.asarray(h0, sdt))


def run(impl, a, **kw):
  q, k, v, g, h0 = a
  return linear_attention(q, k, v, g, initial_state=h0, implementation=impl, **kw)


def outputs_and_grads(impl, args, **kw):
  rng = np.random.default_rng(42)
  shapes = jax.eval_shape(lambda a: run(impl, a, **kw), tuple(args))
  cts = tuple(jnp.asarray(rng.standard_normal(y.shape), y.dtype) for y in shapes)

  @jax.jit
  def f(a):
    out, vjp = jax.vjp(lambda *x: run(impl, x, **kw), *a)
    return out, vjp(cts)

  return f(tuple(args))


def check_parity(args, tol, impl="xla", **kw):
  ref, g_ref = outputs_and_grads("reference", args, **kw)
  out, g_out = outputs_and_grads(impl, args, **kw)
  assert out[0].dtype == args[0].dtype and out[0].shape == ref[0].shape
  assert_close(out[0], ref[0], tol, "o")
  assert_close(out[1], ref[1], tol, "final_state")
  for name, gr, go in zip(NAMES, g_ref, g_out):
    if gr is not None:
      assert_close(go, gr, tol, "d" + name)


@pytest.mark.parametrize("chunk_size,T,gated,segments", [(16, 45, True, True), (32, 75, False, False),
                                                         (64, 70, True, False)])
def test_xla_matches_reference_f64(x64, chunk_size, T, gated, segments):
  B, H, K, V = 2, 2, 12, 20
  args = make_inputs(0, B, T, H, K, V, jnp.float64, gated=gated, with_h0=chunk_size != 32)
  seg = None
  if segments:
    seg = jnp.asarray(np.cumsum(np.random.default_rng(1).random((B, T)) < 0.1, axis=1))
  check_parity(args, 1e-9, chunk_size=chunk_size, segment_ids=seg)


def test_xla_matches_reference_f32():
  check_parity(make_inputs(2, 1, 70, 2, 16, 16, jnp.float32), 1e-5, chunk_size=32)


def test_split_invariance(x64):
  q, k, v, g, h0 = make_inputs(3, 1, 50, 2, 8, 8, jnp.float64)
  o, s = linear_attention(q, k, v, g, initial_state=h0, chunk_size=16, implementation="xla")
  t = 19
  o1, s1 = linear_attention(q[:, :t], k[:, :t], v[:, :t], g[:, :t], initial_state=h0, chunk_size=16,
                            implementation="xla")
  o2, s2 = linear_attention(q[:, t:], k[:, t:], v[:, t:], g[:, t:], initial_state=s1, chunk_size=16,
                            implementation="xla")
  assert_close(jnp.concatenate([o1, o2], 1), o, 1e-12, "o")
  assert_close(s2, s, 1e-12, "state")


def test_ungated_state_is_sum_of_outer_products(x64):
  """Without g, the final state is exactly h0 + sum_t k_t v_t^T (a closed form, not the oracle)."""
  q, k, v, _, h0 = make_inputs(4, 1, 33, 2, 8, 8, jnp.float64, gated=False)
  _, s = linear_attention(q, k, v, initial_state=h0, chunk_size=16, implementation="xla")
  np.testing.assert_allclose(np.asarray(s), np.asarray(h0 + jnp.einsum("bthk,bthv->bhkv", k, v)),
                             rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise():
  q, k, v, g, h0 = make_inputs(0, 1, 8, 2, 4, 6, jnp.float32)
  with pytest.raises(ValueError, match="g must"):
    linear_attention(q, k, v, g[:, :3])
  with pytest.raises(ValueError, match="v must"):
    linear_attention(q, k, v[:, :, :1])
  with pytest.raises(ValueError, match="initial_state must"):
    linear_attention(q, k, v, g, initial_state=h0[:, :1])


@pytest.mark.parametrize("impl,interpret", pallas_modes("pallas_gpu", "pallas_tpu"))
@pytest.mark.parametrize("dtype,D,gated", [(jnp.float32, 12, True), (jnp.bfloat16, 64, False),
                                           (jnp.float32, 128, True)])
def test_pallas_interpret_matches_reference(impl, interpret, dtype, D, gated):
  """Forward and backward kernels: o, final state and dq, dk, dv, dg, dh0 against the oracle; T = 40
  is not a multiple of the chunk; V = D + 8 is padded (and split into V blocks on GPU at D = 64)."""
  args = make_inputs(5, 1, 40, 1, D, D + 8, dtype, gated=gated)
  seg = jnp.asarray([[0] * 9 + [1] + [2] * 30])   # a reset mid-chunk and a length-1 segment
  tol = 1e-5 if dtype == jnp.float32 else 8e-3
  check_parity(args, tol, impl=impl, chunk_size=16, segment_ids=seg, interpret=interpret)
