"""Titans memory op: chunked xla path vs the token-loop oracle, and the oracles listed in
docs/architectures/titans.md, "Tests" (exact recurrence at b = 1, delta rule, decay order, split
invariance, short and ragged inputs), dtypes and backprop memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.testing import assert_close, rel_rms
from pallas_kernels.titans_memory import init_memory_state, titans_memory
from pallas_kernels.titans_memory.reference import inner_loss, mlp_apply

ARG_NAMES = ("q", "k", "v", "theta", "eta", "log_a", "ln_scale", "ln_bias")


def weight_shapes(H, D, L, E=2):
  if L == 1:
    return [(H, D, D)]
  return [(H, E * D, D)] + [(H, E * D, E * D)] * (L - 2) + [(H, D, E * D)]


def make_inputs(seed, B, T, H, D, L, dtype=jnp.float64, *, theta_max=0.5, eta_max=0.9):
  """L2-normalised q, k; theta in (0, theta_max); eta in [0, eta_max) with exact zeros at every third
  token (eta = 0 must not take log 0); log_a in (-0.2, 0]; a perturbed LN affine; w0 ~ N(0, 1/in).

  numpy RNG on purpose: each jax.random call compiles on CPU, numpy costs nothing.
  """
  rng = np.random.default_rng(seed)
  l2 = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = l2(rng.standard_normal((B, T, H, D)))
  k = l2(rng.standard_normal((B, T, H, D)))
  v = rng.standard_normal((B, T, H, D))
  theta = theta_max * rng.uniform(size=(B, T, H, L))
  eta = eta_max * rng.uniform(size=(B, T, H))
  eta[:, ::3] = 0.0
  log_a = -0.2 * rng.uniform(size=(B, T, H))
  ln_s = 1.0 + 0.2 * rng.standard_normal((H, D))
  ln_b = 0.2 * rng.standard_normal((H, D))
  args = tuple(jnp.asarray(x, dtype) for x in (q, k, v, theta, eta, log_a, ln_s, ln_b))
  w0 = tuple(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1]), dtype)
             for s in weight_shapes(H, D, L))
  return args, w0


def random_state(seed, w0, B, chunk_size, dtype=jnp.float64):
  """A mid-stream state: w, s, w_base all different, a random phase per batch row."""
  rng = np.random.default_rng(seed)
  st = init_memory_state(w0, B)
  pert = lambda x, s: jnp.asarray(np.asarray(x) + s * rng.standard_normal(x.shape), dtype)
  return {"w": tuple(pert(x, 0.3) for x in st["w"]),
          "s": tuple(pert(0 * x, 0.1) for x in st["w"]),
          "w_base": tuple(pert(x, 0.3) for x in st["w"]),
          "phase": jnp.asarray(rng.integers(0, chunk_size, B), jnp.int32)}


def float_state(st):
  return (st["w"], st["s"], st["w_base"])


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _outputs_and_grads(a, fs, phase, lengths, cts, *, impl, chunk_size):
  def run(a, fs):
    st = {"w": fs[0], "s": fs[1], "w_base": fs[2], "phase": phase}
    return titans_memory(*a, state=st, chunk_size=chunk_size, lengths=lengths, implementation=impl)

  def loss(a, fs):
    o, new = run(a, fs)
    return sum(jnp.vdot(x, c) for x, c in zip(jax.tree.leaves((o, float_state(new))),
                                                jax.tree.leaves(cts)))

  return run(a, fs), jax.grad(loss, argnums=(0, 1))(a, fs)


def outputs_and_grads(impl, args, state, chunk_size, lengths):
  """(o, final_state) and the gradients of <(o, final float state), random cotangent> w.r.t. every
  input and the initial w, s, w_base. Module-level jit: cases that share shapes share one compile
  (the state, phase and lengths are traced), which keeps the suite fast."""
  rng = np.random.default_rng(42)
  cts = (jnp.asarray(rng.standard_normal(args[0].shape), args[0].dtype),
         jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                      float_state(state)))
  return _outputs_and_grads(args, float_state(state), state["phase"], lengths, cts, impl=impl,
                            chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _outputs(a, state, lengths, *, impl, chunk_size):
  return titans_memory(*a, state=state, chunk_size=chunk_size, lengths=lengths, implementation=impl)


def check_parity(args, state, chunk_size, tol, lengths, grads=True):
  """xla == reference: outputs, final state and (with grads) every input and initial-state grad."""
  if grads:
    (o_r, s_r), (ga_r, gs_r) = outputs_and_grads("reference", args, state, chunk_size, lengths)
    (o_x, s_x), (ga_x, gs_x) = outputs_and_grads("xla", args, state, chunk_size, lengths)
  else:
    o_r, s_r = _outputs(args, state, lengths, impl="reference", chunk_size=chunk_size)
    o_x, s_x = _outputs(args, state, lengths, impl="xla", chunk_size=chunk_size)
  assert o_x.shape == args[0].shape and o_x.dtype == args[0].dtype
  assert_close(o_x, o_r, tol, "o")
  np.testing.assert_array_equal(s_x["phase"], s_r["phase"])
  for key in ("w", "s", "w_base"):
    for l, (a, b) in enumerate(zip(s_x[key], s_r[key])):
      assert a.dtype == b.dtype
      assert_close(a, b, tol, f"state[{key}][{l}]")
  if not grads:
    return
  for name, a, b in zip(ARG_NAMES, ga_x, ga_r):
    assert_close(a, b, tol, "d" + name)
  for key, ga, gb in zip(("w", "s", "w_base"), gs_x, gs_r):
    for l, (a, b) in enumerate(zip(ga, gb)):
      assert_close(a, b, tol, f"d{key}0[{l}]")


def ragged_lengths(chunk, T):
  """Rows with 1, b - 1, b and 3b + 5 real tokens, capped at T."""
  return jnp.asarray([min(n, T) for n in (1, max(chunk - 1, 1), chunk, 3 * chunk + 5)], jnp.int32)


# (depth, chunk, T, grads): each case runs from a fresh and a mid-stream state (random w, s, w_base
# and per-row phase), with per-row lengths 1, b-1, b, 3b+5 (right padding, state taken at the last
# real token) and with all T tokens real. Cases that share shapes share one compile. Gradients are
# compared where marked (the gradient code is the same for every chunk size; the slow variants check
# the rest).
PARITY_CASES = [
    (1, 4, 17, True), (2, 4, 17, True), (2, 16, 53, True),
    (1, 1, 8, False), (1, 16, 53, False), (2, 1, 8, False), (3, 4, 17, False),
    pytest.param(1, 1, 8, True, marks=pytest.mark.slow),
    pytest.param(1, 16, 53, True, marks=pytest.mark.slow),
    pytest.param(2, 1, 8, True, marks=pytest.mark.slow),
    pytest.param(3, 4, 17, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("depth,chunk,T,grads", PARITY_CASES)
def test_xla_matches_reference(x64, depth, chunk, T, grads):
  B, H, D = 4, 2, 4
  args, w0 = make_inputs(depth * 100 + T, B, T, H, D, depth)
  lengths = ragged_lengths(chunk, T)
  for state in (init_memory_state(w0, B), random_state(T, w0, B, chunk)):
    check_parity(args, state, chunk, 1e-9, lengths, grads)
    check_parity(args, state, chunk, 1e-9, jnp.full((B,), T, jnp.int32), grads)


@pytest.mark.parametrize("depth,chunk,T", [(1, 4, 1), (2, 4, 3), (2, 16, 1), (2, 16, 15)])
def test_short_sequences_match_reference(x64, depth, chunk, T):
  """T < b (decode steps, T = b - 1) without `lengths`, from a mid-stream state."""
  B, H, D = 2, 2, 4
  args, w0 = make_inputs(depth + T, B, T, H, D, depth)
  check_parity(args, random_state(T + 1, w0, B, chunk), chunk, 1e-9, None, grads=False)


def test_lengths_equal_truncation(x64):
  """Right padding via `lengths` gives the state of a call on the real tokens only (rows with all
  13, 5 and 0 real tokens)."""
  B, T, H, D, b = 3, 13, 2, 4, 4
  args, w0 = make_inputs(7, B, T, H, D, 2)
  state = random_state(8, w0, B, b)
  lengths = jnp.asarray([T, 5, 0], jnp.int32)
  run = jax.jit(functools.partial(titans_memory, chunk_size=b, implementation="xla"))
  o, st = run(*args, state=state, lengths=lengths)
  o5, st5 = run(*(x[:, :5] if x.ndim > 2 else x for x in args), state=state)
  o_full, st_full = run(*args, state=state, lengths=jnp.full((B,), T, jnp.int32))
  assert_close(o[0], o_full[0], 1e-12, "o row 0")
  assert_close(o[1, :5], o5[1], 1e-12, "o row 1")
  for key in ("w", "s", "w_base"):
    for a, c, full, init in zip(st[key], st5[key], st_full[key], state[key]):
      assert_close(a[0], full[0], 1e-12, f"{key} row 0")
      assert_close(a[1], c[1], 1e-12, f"{key} row 1")
      assert_close(a[2], init[2], 1e-12, f"{key} row 2 (no real token)")
  np.testing.assert_array_equal(st["phase"], (state["phase"] + lengths) % b)


_grad_at = jax.jit(jax.grad(inner_loss))
_read = jax.jit(lambda w, s, b, x: mlp_apply(w, s, b, x[None])[0])


def per_token_loop(args, w0_HOI, chunk_size):
  """Independent frozen-base loop for B = 1 in plain Python (one head at a time)."""
  q, k, v, theta, eta, log_a, ln_s, ln_b = (np.asarray(x) for x in args)
  T, H = q.shape[1], q.shape[2]
  ys = np.zeros_like(q)
  for h in range(H):
    w = [np.asarray(x[h]) for x in w0_HOI]
    s = [np.zeros_like(x) for x in w]
    for t in range(T):
      if t % chunk_size == 0:
        base = tuple(x.copy() for x in w)
      u = _grad_at(base, ln_s[h], ln_b[h], k[0, t, h], v[0, t, h])
      s = [eta[0, t, h] * s_l - theta[0, t, h, l] * np.asarray(u_l)
           for l, (s_l, u_l) in enumerate(zip(s, u))]
      w = [np.exp(log_a[0, t, h]) * w_l + s_l for w_l, s_l in zip(w, s)]
      ys[0, t, h] = np.asarray(_read(tuple(w), ln_s[h], ln_b[h], q[0, t, h]))
  return ys


def test_chunk1_is_exact_recurrence_and_chunk4_differs(x64):
  T, H, D = 7, 2, 4
  args, w0 = make_inputs(3, 1, T, H, D, 2)
  state = init_memory_state(w0, 1)
  y_loop = per_token_loop(args, w0, chunk_size=1)
  o1, _ = titans_memory(*args, state=state, chunk_size=1, implementation="xla")
  o4, _ = titans_memory(*args, state=state, chunk_size=4, implementation="xla")
  assert_close(o1, y_loop, 1e-10, "chunk 1 vs exact recurrence")
  assert_close(o4, per_token_loop(args, w0, chunk_size=4), 1e-10, "chunk 4 vs frozen-base loop")
  assert rel_rms(o4, o1) > 1e-3, "chunk 4 should differ from the exact recurrence"


def linear_inputs(seed, T, D, *, a=1.0):
  args, w0 = make_inputs(seed, 1, T, 1, D, 1)
  q, k, v, theta, eta, log_a, ln_s, ln_b = args
  args = (q, k, v, theta, jnp.zeros_like(eta), jnp.full_like(log_a, np.log(a)), ln_s, ln_b)
  return args, w0


@pytest.mark.parametrize("chunk", [1, 4])
def test_linear_memory_is_delta_rule(x64, chunk):
  """eta = 0, a = 1: b = 1 is DeltaNet with beta = theta; b > 1 is the mini-batch rule
  W_t = W_0 - sum_{i<=t in chunk} theta_i (W_0 k_i - v_i) k_i^T."""
  T, D = 11, 4
  args, w0 = linear_inputs(5, T, D)
  q, k, v, theta = (np.asarray(x)[0, :, 0] for x in args[:4])
  w = np.asarray(w0[0][0])
  y = np.zeros((T, D))
  for t in range(T):
    if t % chunk == 0:
      w_base = w.copy()
    if chunk == 1:
      w = w @ (np.eye(D) - theta[t, 0] * np.outer(k[t], k[t])) + theta[t, 0] * np.outer(v[t], k[t])
    else:
      w = w - theta[t, 0] * np.outer(w_base @ k[t] - v[t], k[t])
    y[t] = w @ q[t]
  for impl in ("reference", "xla"):
    o, st = titans_memory(*args, state=init_memory_state(w0, 1), chunk_size=chunk,
                          implementation=impl)
    assert_close(o[0, :, 0], y, 1e-12, f"{impl} y")
    assert_close(st["w"][0][0, 0], w, 1e-12, f"{impl} W_T")


def test_decay_order_is_titans_not_gated_delta(x64):
  """a < 1: W_t = a W_{t-1} - theta (W_{t-1} k - v) k^T (the gradient sees the undecayed state), and
  not Gated DeltaNet's a W_{t-1} - theta (a W_{t-1} k - v) k^T."""
  T, D, a = 9, 4, 0.7
  args, w0 = linear_inputs(6, T, D, a=a)
  k, v, theta = (np.asarray(x)[0, :, 0] for x in args[1:4])
  w_titans = w_gdn = np.asarray(w0[0][0])
  for t in range(T):
    w_titans = a * w_titans - theta[t, 0] * np.outer(w_titans @ k[t] - v[t], k[t])
    w_gdn = a * w_gdn - theta[t, 0] * np.outer(a * w_gdn @ k[t] - v[t], k[t])
  _, st = titans_memory(*args, state=init_memory_state(w0, 1), chunk_size=1, implementation="xla")
  w_op = st["w"][0][0, 0]
  assert_close(w_op, w_titans, 1e-12, "Titans decay order")
  assert rel_rms(w_op, w_gdn) > 1e-2


@pytest.mark.parametrize("depth", [1, 2])
def test_split_invariance_under_jit(x64, depth):
  """Prefix, one-token decode steps and ragged pieces with the carried state equal one call,
  from a mid-stream state, with splits on and off chunk boundaries."""
  B, T, H, D, b = 2, 23, 2, 4, 4
  args, w0 = make_inputs(11 + depth, B, T, H, D, depth)
  state = random_state(12, w0, B, b)
  run = jax.jit(functools.partial(titans_memory, chunk_size=b, implementation="xla"))
  o_full, st_full = run(*args, state=state)
  cuts = [0, 1, 2, 7, 8, 13, 18, 23]                # pieces of 1, 1, 5, 1, 5, 5, 5 tokens
  outs, st = [], state
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    piece = tuple(x[:, lo:hi] for x in args[:6]) + args[6:]
    o, st = run(*piece, state=st)
    outs.append(o)
  assert_close(jnp.concatenate(outs, axis=1), o_full, 1e-12, "o")
  np.testing.assert_array_equal(st["phase"], st_full["phase"])
  for key in ("w", "s", "w_base"):
    for a, c in zip(st[key], st_full[key]):
      assert_close(a, c, 1e-12, key)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-4), (jnp.bfloat16, 2e-2)])
def test_low_precision_inputs_match_float64_reference(x64, dtype, tol):
  B, T, H, D, b = 2, 21, 2, 8, 8
  args64, w0 = make_inputs(21, B, T, H, D, 2)
  args = tuple(x.astype(dtype) for x in args64)
  # The oracle sees the same (rounded) inputs, in float64: what is left is the op's own error.
  args_ref = tuple(x.astype(jnp.float64) for x in args)
  w0_32 = tuple(w.astype(jnp.float32) for w in w0)
  o_ref, st_ref = titans_memory(*args_ref, state=init_memory_state(
      tuple(w.astype(jnp.float64) for w in w0_32), B), chunk_size=b, implementation="reference")
  o, st = titans_memory(*args, state=init_memory_state(w0_32, B), chunk_size=b,
                        implementation="xla")
  assert o.dtype == dtype and all(w.dtype == jnp.float32 for w in st["w"] + st["s"])
  assert_close(o, o_ref, tol, "o")
  for a, c in zip(st["w"], st_ref["w"]):
    assert_close(a, c, tol, "w")


def residual_bytes(impl, T, b, D=8, E=4):
  """Bytes that jax.vjp keeps for the backward pass (the leaves of the vjp closure), found
  abstractly with jax.eval_shape (nothing is compiled or run)."""
  H, L = 1, 2
  args, _ = make_inputs(0, 1, T, H, D, L, dtype=jnp.float32)
  w0 = tuple(jnp.zeros(s, jnp.float32) for s in [(H, E * D, D), (H, D, E * D)])
  state = init_memory_state(w0, 1)

  def f(a, w):
    return titans_memory(*a, state=dict(state, w=w), chunk_size=b, implementation=impl)

  vjp = jax.eval_shape(lambda a, w: jax.vjp(f, a, w)[1], args, state["w"])
  size_w = sum(w.size for w in w0)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp)), size_w


def test_backprop_keeps_only_chunk_boundary_states():
  """Doubling T from 64 to 128 (b = 16) adds about 4 chunks x (W, S) plus the inputs to the saved
  residuals, not 64 tokens x |W| (the oracle, which does keep per-token weights, shows the gap)."""
  b, D = 16, 8
  x64_, size_w = residual_bytes("xla", 64, b, D)
  x128, _ = residual_bytes("xla", 128, b, D)
  per_chunk_inputs = b * (3 * D + 2 + 3)            # q, k, v, theta (L = 2), eta, log_a, mask
  bound = 4 * (2 * size_w + per_chunk_inputs) * 4 * 1.25
  assert x128 - x64_ <= bound, (x128 - x64_, bound)
  assert x128 - x64_ < 0.25 * 64 * size_w * 4
  r64, _ = residual_bytes("reference", 64, b, D)
  r128, _ = residual_bytes("reference", 128, b, D)
  assert r128 - r64 > 64 * size_w * 4


def test_bad_inputs_raise_value_errors():
  args, w0 = make_inputs(0, 1, 4, 1, 4, 2, dtype=jnp.float32)
  state = init_memory_state(w0, 1)
  with pytest.raises(ValueError, match="chunk_size"):
    titans_memory(*args, state=state, chunk_size=0)
  with pytest.raises(ValueError, match="k must have"):
    titans_memory(args[0], args[1][:, :3], *args[2:], state=state)
  with pytest.raises(ValueError, match="theta"):
    titans_memory(*args[:3], args[3][..., :1], *args[4:], state=state)
  with pytest.raises(ValueError, match="depth"):
    init_memory_state((), 1)
  with pytest.raises(ValueError, match="depth"):
    titans_memory(*args, state={"w": (), "s": (), "w_base": (), "phase": state["phase"]})
  with pytest.raises(ValueError, match="implementation"):
    titans_memory(*args, state=state, implementation="cuda")
