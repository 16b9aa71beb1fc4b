"""Parity of the gated-delta-rule implementations against the token-loop oracle (docs/design.md,
"Invariants")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_delta_rule
from pallas_kernels.testing import assert_close, pallas_modes, rel_rms

ARG_NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def make_inputs(seed, B, T, H, K, V, dtype=jnp.float32, *, decay_div=1.0, with_h0=True):
  """L2-normalised q, k (as Gated DeltaNet feeds them), beta in (0, 1), g = log_sigmoid(x) / n.

  numpy RNG on purpose: each jax.random call compiles (~0.5 s on CPU), numpy costs nothing.
  """
  rng = np.random.default_rng(seed)
  l2 = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = l2(rng.standard_normal((B, T, H, K)))
  k = l2(rng.standard_normal((B, T, H, K)))
  v = rng.standard_normal((B, T, H, V))
  beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, H))))
  g = -np.logaddexp(0.0, -(rng.standard_normal((B, T, H)) + 2.0)) / decay_div
  h0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float64 if dtype == jnp.float64
                   else jnp.float32) if with_h0 else None
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v, beta, g)) + (h0,)


def packed_segments(B, T):
  """Resets mid-chunk, a length-1 segment, segments spanning chunks, and a reused id."""
  base = np.zeros(T, np.int32)
  cuts = sorted({c for c in (5, 6, 21, 40, 41, 70) if c < T})
  for i, c in enumerate(cuts):
    base[c:] = (i + 1) % 3          # ids repeat: a change, not a new value, is what resets
  return jnp.asarray(np.stack([base, np.roll(base, 3)])[:B])


def run(impl, args, **kw):
  q, k, v, beta, g, h0 = args
  return gated_delta_rule(q, k, v, beta, g, initial_state=h0, implementation=impl, **kw)


def outputs_and_grads(impl, args, **kw):
  """(o, final_state) and the gradients of <(o, state), random cotangent> w.r.t. every given arg,
  in one jitted function (one compile per implementation keeps the suite fast)."""

  @jax.jit
  def f(a):
    out, vjp = jax.vjp(lambda *x: run(impl, x, **kw), *a)
    return out, vjp(cts)

  rng = np.random.default_rng(42)
  shapes = jax.eval_shape(lambda a: run(impl, a, **kw), tuple(args))
  cts = tuple(jnp.asarray(rng.standard_normal(y.shape), y.dtype) for y in shapes)
  return f(tuple(args))


def check_parity(args, tol_fwd, tol_grad, impl="xla", tol_gate=None, **kw):
  """Outputs, final state and every gradient; tol_gate (default tol_grad) is for dbeta and dg."""
  tol_gate = tol_grad if tol_gate is None else tol_gate
  ref, g_ref = outputs_and_grads("reference", args, **kw)
  out, g_out = outputs_and_grads(impl, args, **kw)
  assert out[0].shape == ref[0].shape and out[0].dtype == args[0].dtype
  assert out[1].dtype == (jnp.float64 if args[0].dtype == jnp.float64 else jnp.float32)
  assert_close(out[0], ref[0], tol_fwd, "o")
  assert_close(out[1], ref[1], tol_fwd, "final_state")
  for name, gr, go in zip(ARG_NAMES, g_ref, g_out):
    if gr is not None:
      assert_close(go, gr, tol_gate if name in ("beta", "g") else tol_grad, "d" + name)


@pytest.mark.parametrize("chunk_size,T,segments", [(16, 40, True), (32, 75, False), (64, 75, True),
                                                   (64, 64, False), (16, 1, False)])
def test_xla_matches_reference_f64(x64, chunk_size, T, segments):
  B, H, K, V = 2, 2, 12, 20
  args = make_inputs(0, B, T, H, K, V, jnp.float64, with_h0=(chunk_size != 32))
  seg = packed_segments(B, T) if segments else None
  check_parity(args, 1e-9, 1e-9, chunk_size=chunk_size, segment_ids=seg)


@pytest.mark.parametrize("decay_div", [0.01, 10.0])
def test_xla_matches_reference_f32(decay_div):
  args = make_inputs(1, 1, 70, 2, 16, 16, jnp.float32, decay_div=decay_div)
  # g/0.01 drives exp(G) to underflow within a few tokens; dg then sums many cancelling terms.
  check_parity(args, 1e-5, 1e-5, tol_gate=5e-5, chunk_size=32)


def test_xla_bf16_inputs():
  args = make_inputs(2, 1, 50, 2, 16, 16, jnp.bfloat16)
  ref = run("reference", args)
  out = run("xla", args, chunk_size=16)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.float32
  assert_close(out[0], ref[0], 5e-3, "o")   # FLA's fp16 test_chunk tolerance
  assert_close(out[1], ref[1], 5e-3, "final_state")


def test_repeated_keys_and_zero_decay_are_stable():
  """All keys equal and beta ~ 1 make (I + A) as ill-conditioned as a chunk gets; g = 0 at random."""
  q, k, v, beta, g, h0 = make_inputs(3, 1, 64, 1, 16, 16)
  k = jnp.broadcast_to(k[:, :1], k.shape)
  beta = jnp.full_like(beta, 0.999)
  g = jnp.where(np.random.default_rng(9).random(g.shape) < 0.5, 0.0, g)
  args = (q, k, v, beta, g, h0)
  check_parity(args, 1e-5, 1e-4, chunk_size=64)


@pytest.mark.parametrize("impl", ["xla"])
@pytest.mark.parametrize("split", [22, 63])   # inside a chunk; the last step a one-token decode
def test_split_invariance(x64, impl, split):
  B, T, H, K, V = 2, 64, 2, 8, 12
  q, k, v, beta, g, h0 = make_inputs(4, B, T, H, K, V, jnp.float64)
  seg = packed_segments(B, T)   # no segment starts at 22 or 63
  op = jax.jit(lambda *a, h0_, seg_: gated_delta_rule(*a, initial_state=h0_, segment_ids=seg_,
                                                      chunk_size=16, implementation=impl))
  o, s = op(q, k, v, beta, g, h0_=h0, seg_=seg)
  o1, s1 = op(*(x[:, :split] for x in (q, k, v, beta, g)), h0_=h0, seg_=seg[:, :split])
  o2, s2 = op(*(x[:, split:] for x in (q, k, v, beta, g)), h0_=s1, seg_=seg[:, split:])
  assert_close(jnp.concatenate([o1, o2], axis=1), o, 1e-12, "o")
  assert_close(s2, s, 1e-12, "state")


def test_segment_reset_forgets_the_past(x64):
  """Outputs after a reset do not depend on the initial state or on tokens before the reset."""
  B, T, H, K, V = 1, 40, 1, 8, 8
  q, k, v, beta, g, h0 = make_inputs(5, B, T, H, K, V, jnp.float64)
  seg = jnp.asarray([[0] * 13 + [1] * 27])

  def after(x_v, x_h0):
    return gated_delta_rule(q, k, x_v, beta, g, initial_state=x_h0, segment_ids=seg,
                            chunk_size=16, implementation="xla")[0][:, 13:]

  base = after(v, h0)
  other = after(v.at[:, :13].set(7.0), 3.0 * h0)
  np.testing.assert_allclose(np.asarray(other), np.asarray(base), rtol=0, atol=1e-12)
  assert rel_rms(gated_delta_rule(q, k, v, beta, g, initial_state=3.0 * h0, chunk_size=16,
                                  implementation="xla")[0][:, 13:], base) > 1e-3


def test_causality():
  """d o_t / d v_s = 0 for s > t."""
  q, k, v, beta, g, _ = make_inputs(6, 1, 24, 1, 8, 8)
  t = 10
  jac = jax.grad(lambda v_: gated_delta_rule(q, k, v_, beta, g, chunk_size=16,
                                             implementation="xla")[0][0, t].sum())(v)
  assert float(jnp.abs(jac[:, t + 1:]).max()) == 0.0
  assert float(jnp.abs(jac[:, :t + 1]).max()) > 0.0


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_backward_keeps_only_chunk_boundary_states(impl):
  from jax._src.ad_checkpoint import saved_residuals
  B, T, H, K, V, C = 1, 100, 2, 16, 16, 32
  q, k, v, beta, g, h0 = make_inputs(7, B, T, H, K, V)
  f = lambda *a: gated_delta_rule(*a, initial_state=h0, chunk_size=C, implementation=impl,
                                  interpret=True)
  shapes = [r[0].shape for r in saved_residuals(f, q, k, v, beta, g)]
  NT = -(-T // C)
  states = (NT, B, H, K, V) if impl == "xla" else (B, H, NT, K, V)
  assert states in shapes                                  # the boundary states
  assert all(math_prod(s) <= NT * C * B * H * max(K, V) for s in shapes), shapes
  assert not any(len(s) >= 2 and s[-2:] == (C, C) for s in shapes), shapes   # nothing intra-chunk


def math_prod(shape):
  return int(np.prod(shape)) if shape else 1


def test_default_dispatch_is_xla_on_cpu():
  args = make_inputs(8, 1, 20, 1, 8, 8)
  np.testing.assert_array_equal(np.asarray(run(None, args, chunk_size=16)[0]),
                                np.asarray(run("xla", args, chunk_size=16)[0]))


def test_bad_inputs_raise():
  q, k, v, beta, g, h0 = make_inputs(0, 1, 8, 2, 4, 6)
  with pytest.raises(ValueError, match="q must be"):
    gated_delta_rule(q[0], k, v, beta, g)
  with pytest.raises(ValueError, match="k must"):
    gated_delta_rule(q, k[..., :3], v, beta, g)
  with pytest.raises(ValueError, match="v must"):
    gated_delta_rule(q, k, v[:, :3], beta, g)
  with pytest.raises(ValueError, match="beta must"):
    gated_delta_rule(q, k, v, beta[..., :1], g)
  with pytest.raises(ValueError, match="g must"):
    gated_delta_rule(q, k, v, beta, g[:, :2])
  with pytest.raises(ValueError, match="initial_state must"):
    gated_delta_rule(q, k, v, beta, g, initial_state=h0[..., :2])
  with pytest.raises(ValueError, match="segment_ids must"):
    gated_delta_rule(q, k, v, beta, g, segment_ids=jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="unknown implementation"):
    gated_delta_rule(q, k, v, beta, g, implementation="cuda")


# Pallas kernels in interpret mode (CPU). Tolerances: 1e-5 for float32; FLA's
# test_chunk tolerances for bf16 (0.005 o/state, 0.008 dq/dk/dv/dh0, 0.02 dbeta/dg).
PALLAS_CASES = [
    # B, T, H, K, V, chunk, dtype, segments
    pytest.param(2, 75, 2, 12, 20, 32, jnp.float32, True, id="f32-odd-dims-segments"),
    pytest.param(1, 40, 1, 64, 64, 16, jnp.bfloat16, True, id="bf16-d64"),
    pytest.param(1, 20, 1, 128, 128, 16, jnp.float32, True, id="f32-d128-segments"),
    # chunk_size 64 at D = 128: the GPU kernels run chunks of 32 there (shared memory), exactly.
    pytest.param(1, 40, 1, 128, 128, 64, jnp.float32, False, id="f32-d128-chunk64"),
]


@pytest.mark.parametrize("impl,interpret", pallas_modes("pallas_gpu", "pallas_tpu"))
@pytest.mark.parametrize("B,T,H,K,V,chunk,dtype,segments", PALLAS_CASES)
def test_pallas_interpret_matches_reference(impl, interpret, B, T, H, K, V, chunk, dtype, segments):
  args = make_inputs(10, B, T, H, K, V, dtype)
  seg = packed_segments(B, T) if segments else None
  tols = (1e-5, 1e-5, 1e-5) if dtype == jnp.float32 else (5e-3, 8e-3, 2e-2)
  check_parity(args, tols[0], tols[1], impl=impl, tol_gate=tols[2], chunk_size=chunk,
               segment_ids=seg, interpret=interpret)


@pytest.mark.parametrize("delta", [True, False])
def test_chunk_step_bwd_matches_autodiff(x64, delta):
  """The hand-derived chunk backward the Pallas kernels run (_common.chunk_step_bwd)
  equals jax.vjp of the forward chunk in float64, with resets mid-chunk and a length-1 segment; and
  splitting the value columns into blocks (the GPU kernel's V-split grid) gives the same gradients:
  dv, dS per block, dq, dk, dbeta, dG as sums over blocks."""
  from pallas_kernels.gated_delta_rule import _common
  rng = np.random.default_rng(12)
  C, K, V = 16, 8, 12
  x = lambda *s: jnp.asarray(rng.standard_normal(s))
  q, k, v, S, do, dS_next = x(C, K), x(C, K) / 3, x(C, V), x(K, V), x(C, V), x(K, V)
  beta = jnp.asarray(rng.random((C, 1)))
  G = jnp.cumsum(-0.5 * jnp.asarray(rng.random((C, 1))), axis=0)
  seg = jnp.asarray([0.0] * 3 + [1.0] + [2.0] * 12)[:, None]          # previous chunk's segment: 0
  cin, tail = (seg == 0).astype(jnp.float64), (seg == seg[-1]).astype(jnp.float64)
  masks = dict(Gr=G.T, segc=seg, segr=seg.T, cin=cin, tail=tail)
  fwd = lambda q, k, v, beta, G, S: _common.chunk_step(
      q, k, v, beta, G, G.T, seg, seg.T, cin, tail, S, scale=0.3, delta=delta)
  want = jax.jit(lambda *a: jax.vjp(fwd, *a)[1]((do, dS_next)))(q, k, v, beta, G, S)
  bwd = jax.jit(lambda v, S, do, dS: _common.chunk_step_bwd(
      q, k, v, beta, G, S=S, do=do, dS_next=dS, scale=0.3, delta=delta, **masks))
  got = bwd(v, S, do, dS_next)
  blocks = [bwd(v[:, c], S[:, c], do[:, c], dS_next[:, c]) for c in (slice(0, 6), slice(6, V))]
  split = [sum(b[i] for b in blocks) for i in (0, 1)] + [
      jnp.concatenate([b[2] for b in blocks], 1), sum(b[3] for b in blocks),
      sum(b[4] for b in blocks), jnp.concatenate([b[5] for b in blocks], 1)]
  for name, w, g1, g2 in zip(("dq", "dk", "dv", "dbeta", "dG", "dS"), want, got, split):
    if name == "dbeta" and not delta:
      assert float(jnp.abs(g1).max()) == 0.0
      continue
    assert float(jnp.abs(w).max()) > 1e-3, name                 # a live gradient, not zeros
    np.testing.assert_allclose(np.asarray(g1), np.asarray(w), rtol=0, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(w), rtol=0, atol=1e-12, err_msg=name)


def test_pallas_without_initial_state():
  args = make_inputs(11, 1, 33, 1, 16, 16, jnp.float32, with_h0=False)
  check_parity(args, 1e-5, 1e-5, impl="pallas_gpu", chunk_size=16, interpret=True)
