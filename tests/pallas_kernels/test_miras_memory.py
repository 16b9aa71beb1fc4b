"""Miras memory op (Moneta, Yaad, Memora): chunked xla path vs the token-loop oracle, and the
reductions listed in docs/architectures/miras.md, "Tests" (Yaad with delta -> inf and Moneta with
p = q = 2 are the l2 memory; Memora rows sum to c), split invariance and right padding, all in
float64."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.miras_memory import (
  MODELS,
  STATE_KEY,
  init_miras_state,
  miras_memory,
  miras_weights,
)
from pallas_kernels.testing import assert_close, assert_tree_close, rel_rms
from pallas_kernels.titans_memory import init_memory_state, memory_apply, titans_memory

TOL = 1e-9


def make_inputs(seed, B=2, T=7, H=2, D=3, E=2, L=2):
  """(q, k, v, theta, a, delta, ln_scale, ln_bias), x0 (per-layer [H, out, in]) and kl scale [H, L]
  in float64; numpy RNG (no per-call compiles). delta spans both Huber branches."""
  rng = np.random.default_rng(seed)
  l2 = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = l2(rng.standard_normal((B, T, H, D)))
  k = l2(rng.standard_normal((B, T, H, D)))
  v = rng.standard_normal((B, T, H, D))
  theta = 0.4 * rng.uniform(size=(B, T, H, L))
  a = 1.0 - 0.2 * rng.uniform(size=(B, T, H))
  delta = rng.uniform(0.3, 2.5, size=(B, T, H))
  ln_s = 1.0 + 0.2 * rng.standard_normal((H, D))
  ln_b = 0.2 * rng.standard_normal((H, D))
  shapes = [(H, D, D)] if L == 1 else [(H, E * D, D), (H, D, E * D)]
  x0 = tuple(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1])) for s in shapes)
  c = jnp.asarray(rng.uniform(0.5, 2.0, size=(H, L)))
  args = tuple(jnp.asarray(x) for x in (q, k, v, theta, a, delta, ln_s, ln_b))
  return args, x0, c


@functools.partial(jax.jit, static_argnames=("model", "chunk", "impl", "lag", "exact"))
def run(model, args, x0, c, *, chunk, impl, state=None, lengths=None, lag=None, exact=False):
  """One jitted call (a single compile is much cheaper than eager op-by-op dispatch).

  Memora runs with its lag token unless lag=False; exact=True reads phi(X_t) at every token."""
  bias, ret = MODELS[model]
  lag = model == "memora" if lag is None else lag
  state = init_miras_state(x0, args[0].shape[0], ret) if state is None else state
  return miras_memory(*args, state=state, bias=bias, retention=ret, kl_scale_HL=c, lag_token=lag,
                      exact_read=exact, chunk_size=chunk, implementation=impl, lengths=lengths)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("chunk", [1, 4])
def test_xla_matches_reference(x64, model, chunk):
  args, x0, c = make_inputs(0)
  outs = {impl: run(model, args, x0, c, chunk=chunk, impl=impl) for impl in ("reference", "xla")}
  assert_close(outs["xla"][0], outs["reference"][0], TOL, "o")
  assert_tree_close(outs["xla"][1], outs["reference"][1], TOL, "state")


@pytest.mark.parametrize("model", sorted(MODELS))
def test_aligned_call_matches_general_call(x64, model):
  """assume_aligned (every chunk starts at its base: the read starts from phi(X_0) itself, and
  after Memora's lag token from phi(X_1)) gives the general path's outputs, state and gradients."""
  args, x0, c = make_inputs(5, T=8)
  bias, ret = MODELS[model]

  def f(args, aligned):
    y, st = miras_memory(*args, state=init_miras_state(x0, 2, ret), bias=bias, retention=ret,
                         kl_scale_HL=c, lag_token=model == "memora", chunk_size=4,
                         implementation="xla", assume_aligned=aligned)
    return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(x)) for x in st[STATE_KEY[ret]]), (y, st)

  (l_a, (y_a, st_a)), g_a = jax.jit(jax.value_and_grad(lambda a: f(a, True), has_aux=True))(args)
  (l_g, (y_g, st_g)), g_g = jax.jit(jax.value_and_grad(lambda a: f(a, False), has_aux=True))(args)
  assert_close(y_a, y_g, TOL, "o")
  assert_tree_close(st_a[STATE_KEY[ret]], st_g[STATE_KEY[ret]], TOL, "state")
  assert_tree_close(g_a, g_g, TOL, "grads")


SLOW = pytest.mark.slow


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("chunk", [4])  # chunk 1 is the token loop itself
def test_grads_match_reference(x64, model, chunk):
  """Outer gradients (through the inner gradient: second order) w.r.t. every input, x0 and c."""
  args, x0, c = make_inputs(0)

  def loss(impl):
    def f(args, x0, c):
      y, st = run(model, args, x0, c, chunk=chunk, impl=impl)
      return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(x)) for x in jax.tree.leaves(st)
                                       if x.dtype == jnp.float64)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))
  g_ref = loss("reference")(args, x0, c)
  g_xla = loss("xla")(args, x0, c)
  assert_tree_close(g_xla, g_ref, TOL, "grads")
  if model == "yaad":  # delta is used: its gradient is non-zero (only through the clipped branch)
    assert float(jnp.abs(g_ref[0][5]).sum()) > 1e-6
  if model == "memora":  # the KL scale c reaches the outputs
    assert float(jnp.abs(g_ref[2]).sum()) > 1e-6


def test_chunk_size_changes_the_model(x64):
  """b = 1 (exact recurrence) and b = 4 (frozen base) must differ."""
  args, x0, c = make_inputs(1)
  for model in MODELS:
    y1, _ = run(model, args, x0, c, chunk=1, impl="xla")
    y4, _ = run(model, args, x0, c, chunk=4, impl="xla")
    assert rel_rms(y4, y1) > 1e-4, model


def test_huber_threshold_is_per_entry():
  """Yaad's delta thresholds the RMS error: just inside, g = e (RMS delta); just outside,
  delta ssign(e) (RMS ~delta): the two branches meet at the threshold, for any width D."""
  from pallas_kernels.titans_memory.rules import MemoryRule
  rule = MemoryRule(bias="huber", momentum=False)
  rng = np.random.default_rng(0)
  for D in (4, 32, 128):
    e = rng.standard_normal(D)
    rms = float(np.sqrt(np.mean(e ** 2)))
    for factor, expect_l2 in ((1.001, True), (0.999, False)):
      delta = jnp.asarray(rms * factor)
      g = np.asarray(rule.output_grad(jnp.asarray(e), None, delta))
      if expect_l2:
        np.testing.assert_allclose(g, e, rtol=1e-6)
      else:
        np.testing.assert_allclose(g, float(delta) * np.sign(e), rtol=1e-3, atol=0.05 * rms)
      g_rms = float(np.sqrt(np.mean(g ** 2)))
      assert abs(g_rms / rms - 1) < 0.01, (D, factor, g_rms, rms)


@pytest.mark.parametrize("chunk", [1, 4])
def test_yaad_infinite_delta_is_the_l2_memory(x64, chunk):
  """Huber with delta -> inf is the l2 bias; with l2 retention that is Titans with eta = 0."""
  args, x0, c = make_inputs(2)
  q, k, v, theta, a, delta, ln_s, ln_b = args
  big = args[:5] + (jnp.full_like(delta, 1e9),) + args[6:]
  y, st = run("yaad", big, x0, c, chunk=chunk, impl="xla")
  y_l2, st_l2 = miras_memory(*args, state=init_miras_state(x0, 2, "l2"), bias="l2",
                             retention="l2", chunk_size=chunk, implementation="xla")
  assert_close(y, y_l2, TOL, "o")
  y_t, st_t = titans_memory(q, k, v, theta, jnp.zeros_like(a), jnp.log(a), ln_s, ln_b,
                            state=init_memory_state(x0, 2), chunk_size=chunk, implementation="xla")
  assert_close(y, y_t, TOL, "o vs titans")
  assert_tree_close(st["w"], st_t["w"], TOL, "w vs titans")
  # and a finite delta actually clips (the test above is not vacuous)
  y_clip, _ = run("yaad", args, x0, c, chunk=chunk, impl="xla")
  assert rel_rms(y_clip, y) > 1e-3


@pytest.mark.parametrize("chunk", [1, 4])
def test_moneta_p2_q2_is_the_l2_memory(x64, chunk):
  """||e||_2^2 / 2 has output gradient e, and phi_2(A) = A: Moneta(p=2, q=2) is the l2 memory."""
  args, x0, c = make_inputs(3)
  y, st = miras_memory(*args, state=init_miras_state(x0, 2, "lq"), bias="lp", p=2.0,
                       retention="lq", q_norm=2.0, chunk_size=chunk, implementation="xla")
  y_l2, st_l2 = miras_memory(*args, state=init_miras_state(x0, 2, "l2"), bias="l2",
                             retention="l2", chunk_size=chunk, implementation="xla")
  assert_close(y, y_l2, TOL, "o")
  assert_tree_close(st["a"], st_l2["w"], TOL, "state")
  y3, _ = run("moneta", args, x0, c, chunk=chunk, impl="xla")     # p = 3, q = 4 is different
  assert rel_rms(y3, y) > 1e-3


def test_memora_lag_token(x64):
  """The lag token makes chunks {1, b-1}: at b = 2 every chunk is one token (== b = 1), at b = 4 it
  changes the model, and the xla path matches the oracle without it too."""
  args, x0, c = make_inputs(8)
  y1, s1 = run("memora", args, x0, c, chunk=1, impl="xla", lag=False)
  y2, s2 = run("memora", args, x0, c, chunk=2, impl="xla", lag=True)
  assert_close(y2, y1, TOL, "b=2 with lag == b=1")
  assert_tree_close(s2["z"], s1["z"], TOL, "state")
  y4, _ = run("memora", args, x0, c, chunk=4, impl="xla", lag=True)
  y4n, _ = run("memora", args, x0, c, chunk=4, impl="xla", lag=False)
  y4r, _ = run("memora", args, x0, c, chunk=4, impl="reference", lag=False)
  assert rel_rms(y4, y4n) > 1e-4
  assert_close(y4n, y4r, TOL, "no lag vs reference")


def test_memora_rows_sum_to_c(x64):
  """At a chunk end (T = 8, b = 4) the read weights are phi(Z) = c softmax_row(Z)."""
  args, x0, c = make_inputs(4, T=8)
  _, st = run("memora", args, x0, c, chunk=4, impl="xla")
  assert int(st["phase"][0]) == 0
  ws = miras_weights(st, "kl", kl_scale_HL=c)
  for l, w in enumerate(ws):
    assert bool(jnp.all(w > 0))
    np.testing.assert_allclose(np.asarray(w.sum(-1)),
                               np.broadcast_to(np.asarray(c[:, l])[None, :, None], w.shape[:-1]),
                               rtol=1e-12)


@pytest.mark.parametrize("model", ["moneta", pytest.param("yaad", marks=SLOW),
                                   pytest.param("memora", marks=SLOW)])
def test_split_invariance_and_padding(x64, model):
  """Prefix then suffix with the carried state equals one call, for cuts on and off chunk
  boundaries; right padding with `lengths` equals the truncated sequence."""
  T, chunk = 11, 4
  args, x0, c = make_inputs(5, T=T)
  y, st = run(model, args, x0, c, chunk=chunk, impl="xla")
  for cuts in ([1, 6],):  # a one-token step, then a cut off the chunk grid
    state, outs, prev = None, [], 0
    for cut in cuts + [T]:
      part = tuple(x[:, prev:cut] for x in args[:6]) + args[6:]
      y_p, state = run(model, part, x0, c, chunk=chunk, impl="xla", state=state)
      outs.append(y_p)
      prev = cut
    assert_close(jnp.concatenate(outs, 1), y, TOL, f"o {cuts}")
    assert_tree_close(state, st, TOL, f"state {cuts}")
  lengths = jnp.array([T, 6])
  y_pad, st_pad = run(model, args, x0, c, chunk=chunk, impl="xla", lengths=lengths)
  y_ref, st_ref = run(model, args, x0, c, chunk=chunk, impl="reference", lengths=lengths)
  assert_close(y_pad, y_ref, TOL, "padded o vs reference")
  assert_tree_close(st_pad, st_ref, TOL, "padded state vs reference")
  short = tuple(x[:, :6] for x in args[:6]) + args[6:]
  y_s, st_s = run(model, short, x0, c, chunk=chunk, impl="xla")
  assert_close(y_pad[1, :6], y_s[1], TOL, "padded row")
  # padding tokens read the state at the last real token
  w_last = miras_weights(st_s, MODELS[model][1], kl_scale_HL=c)
  read = memory_apply(w_last, args[6], args[7], args[0][:, 6:])
  assert_close(y_pad[1, 6:], read[1], TOL, "padded reads")
  assert_tree_close(jax.tree.map(lambda x: x[1], st_pad), jax.tree.map(lambda x: x[1], st_s), TOL,
                    "padded state")


@pytest.mark.parametrize("model", ["moneta", "memora"])
def test_phi_at_chunk_ends_only(x64, model):
  """The default read applies phi at chunk ends only: at b = 1 (every token ends a chunk) it is the
  exact per-token read; at b = 4 it differs from it inside chunks but not at chunk ends, where both
  read phi(X_t) of the same state; the opt-in exact read's xla path matches its oracle. Mid-chunk,
  the linearised weights are beta_t phi(X_0) - (the chunk's updates), checked against a direct
  construction from the state."""
  T = 10  # the state ends two tokens into a chunk (past Memora's lag token)
  args, x0, c = make_inputs(11, T=T)
  lin1, st1 = run(model, args, x0, c, chunk=1, impl="xla", exact=False)
  ex1, sx1 = run(model, args, x0, c, chunk=1, impl="reference", exact=True)
  assert_close(lin1, ex1, TOL, "b=1: linearised == exact")
  assert_tree_close(st1, sx1, TOL, "b=1 state")
  lin4, st4 = run(model, args, x0, c, chunk=4, impl="xla", exact=False)
  ex4, sx4 = run(model, args, x0, c, chunk=4, impl="xla", exact=True)
  ex4r, _ = run(model, args, x0, c, chunk=4, impl="reference", exact=True)
  assert_close(ex4, ex4r, TOL, "exact read: xla == reference")
  assert_tree_close(st4, sx4, TOL, "the read rule does not change the state")
  ends = np.array([3, 7])  # tokens that end a chunk (the lag token also reads exactly at 0, 4, 8)
  assert_close(lin4[:, ends], ex4[:, ends], TOL, "chunk ends read phi(X_t)")
  inside = np.array([1, 2, 5, 6])
  assert rel_rms(lin4[:, inside], ex4[:, inside]) > 1e-3
  # the state after T = 10 tokens is inside a chunk: its read weights are the linearised ones,
  # J(X) + P (phi(base) - J(base)): for "kl" J is the Jacobian of c softmax at rows equal to the
  # base's mean row s, J(r) = c (s * r - <s, r> s); for "lq" (q = 4) the mean slope of phi_4,
  # mean(3 A^2 + eps) / sqrt(mean((A^2 + eps)^2)), times r
  ret = MODELS[model][1]
  base_w = miras_weights({**st4, STATE_KEY[ret]: st4["base"], "base_decay": jnp.ones_like(
      st4["base_decay"])}, ret, kl_scale_HL=c)            # phi(base)
  lin_w = miras_weights(st4, ret, kl_scale_HL=c)

  def J(l, r):
    b_, r = np.asarray(st4["base"][l]), np.asarray(r)
    if ret == "lq":
      kappa = (3 * b_ ** 2 + 1e-6).mean((-2, -1)) / np.sqrt(((b_ ** 2 + 1e-6) ** 2).mean((-2, -1)))
      return kappa[..., None, None] * r
    s_row = np.asarray(jax.nn.softmax(b_, -1)).mean(-2)[..., None, :]
    return np.asarray(c)[None, :, l, None, None] * (s_row * r - (r * s_row).sum(-1)[..., None]
                                                    * s_row)

  want = tuple(J(l, x) + st4["base_decay"][..., None, None] * (p_ - J(l, b_))
               for l, (x, p_, b_) in enumerate(zip(st4[STATE_KEY[ret]], base_w, st4["base"])))
  assert rel_rms(st4[STATE_KEY[ret]][0], st4["base"][0]) > 1e-3  # not a fresh base
  assert_tree_close(lin_w, want, TOL, "linearised weights")
  last = memory_apply(lin_w, args[6], args[7], args[0][:, -1:])
  assert_close(lin4[:, -1:], last, TOL, "the last token reads the state's read weights")


def test_linear_memory_and_dot_bias(x64):
  """Depth 1 (linear memory) and the dot-product bias also match the oracle."""
  args, x0, c = make_inputs(6, L=1)
  for bias, ret in (("dot", "l2"), ("lp", "lq"), ("huber", "kl")):
    st = init_miras_state(x0, 2, ret)
    outs = [miras_memory(*args, state=st, bias=bias, retention=ret, kl_scale_HL=c, chunk_size=3,
                         implementation=impl) for impl in ("reference", "xla")]
    assert_close(outs[1][0], outs[0][0], TOL, f"{bias}/{ret}")
    assert_tree_close(outs[1][1], outs[0][1], TOL, f"{bias}/{ret} state")


def test_float32_and_errors():
  args, x0, c = make_inputs(7)
  args32 = tuple(x.astype(jnp.float32) for x in args)
  x32 = tuple(x.astype(jnp.float32) for x in x0)
  y, st = run("moneta", args32, x32, c.astype(jnp.float32), chunk=4, impl=None)
  assert y.dtype == jnp.float32 and st["a"][0].dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))
  with pytest.raises(ValueError, match="unknown bias"):
    miras_memory(*args32, state=init_miras_state(x32, 2), bias="l1")
  with pytest.raises(ValueError, match="keys a, base, base_decay, phase"):
    miras_memory(*args32, state=init_miras_state(x32, 2, "l2"), retention="lq")
  with pytest.raises(ValueError, match="theta must be"):
    miras_memory(*args32[:3], args32[3][..., :1], *args32[4:], state=init_miras_state(x32, 2))


def test_kl_read_map_is_the_softmax_jacobian_at_equal_rows(x64):
  """rules.MemoryRule.read_map for "kl": the exact first-order change of c softmax_row(Z) when
  every row of the base is the same (so a rank-1 update stays rank-1), and it keeps each row's
  sum (the weights' rows sum to c)."""
  from pallas_kernels.titans_memory.rules import MemoryRule
  rule = MemoryRule(retention="kl", momentum=False)
  rng = np.random.default_rng(0)
  row = rng.standard_normal(6)
  base = jnp.asarray(np.tile(row, (5, 1)))                    # [out 5, in 6], equal rows
  c = jnp.asarray([1.7])
  dZ = jnp.asarray(rng.standard_normal((5, 6)))
  _, want = jax.jvp(lambda z: rule.phi((z,), c)[0], (base,), (dZ,))
  got = rule.read_map((base,), c)[0](dZ)
  assert_close(got, want, 1e-12, "J dZ")
  np.testing.assert_allclose(np.asarray(got).sum(-1), 0.0, atol=1e-12)
  # with unequal rows it is the Jacobian at the mean row, not each row's own
  base2 = jnp.asarray(rng.standard_normal((5, 6)))
  _, own = jax.jvp(lambda z: rule.phi((z,), c)[0], (base2,), (dZ,))
  assert rel_rms(rule.read_map((base2,), c)[0](dZ), own) > 0.05


def test_softmax_rows_vjp_equals_autodiff(x64):
  """The "kl" chunk's softmax with a hand-written backward (it keeps its output only) against
  autodiff of jax.nn.softmax, and Memora's factored phi (c applied after the matmul) against phi."""
  from pallas_kernels.titans_memory.rules import MemoryRule, softmax_rows
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 7), jnp.float64)
  loss = lambda f: lambda z: jnp.sum(jnp.sin(3.0 * f(z)) * jnp.arange(7.0))
  np.testing.assert_allclose(jax.grad(loss(softmax_rows))(z),
                             jax.grad(loss(lambda z: jax.nn.softmax(z, axis=-1)))(z),
                             rtol=1e-12, atol=1e-14)
  rule = MemoryRule(retention="kl", momentum=False)
  c_L = jnp.asarray([[0.7, 1.9]], jnp.float64)                 # [H = 1, L = 2]
  zs = (z[:, :1], 2.0 * z[:, :1, :, :5])
  mats, scales = rule.phi_factored(zs, c_L)
  for m, c, w in zip(mats, scales, rule.phi(zs, c_L)):
    np.testing.assert_allclose(c * m, w, rtol=1e-14)
