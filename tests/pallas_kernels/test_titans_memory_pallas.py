"""Titans memory, pallas_gpu (the per-chunk Pallas kernel inside the xla engine): parity with
`reference` and `xla` in outputs, final state and gradients (interpret mode on CPU, compiled on a
GPU), and the NotImplementedError / fallback contract of docs/design.md, "Kernel ops"."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.miras_memory import miras_memory
from pallas_kernels.testing import assert_close, pallas_modes, tol_for
from pallas_kernels.titans_memory import (
  IMPLEMENTATIONS,
  chunk_vjp,
  init_memory_state,
  pallas_gpu,
  titans_memory,
)
from pallas_kernels.titans_memory import xla as titans_xla

ARG_NAMES = ("q", "k", "v", "theta", "eta", "log_a", "ln_scale", "ln_bias")
CHUNK = 16


def make_case(seed, B, T, H, D, L, dtype):
  """Inputs as the Titans layer makes them (unit q, k; E = 4 D at depth 2) and a mid-stream state
  (w, s, w_base all different, a random phase per row). eta is exactly 0 at one token in the
  middle only, so the gradient of the initial momentum is not trivially zero."""
  rng = np.random.default_rng(seed)
  l2 = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  eta = 0.9 * rng.uniform(size=(B, T, H))
  eta[:, T // 2] = 0.0
  args = (l2(rng.standard_normal((B, T, H, D))), l2(rng.standard_normal((B, T, H, D))),
          rng.standard_normal((B, T, H, D)), 0.5 * rng.uniform(size=(B, T, H, L)), eta,
          -0.2 * rng.uniform(size=(B, T, H)), 1.0 + 0.2 * rng.standard_normal((H, D)),
          0.2 * rng.standard_normal((H, D)))
  args = tuple(jnp.asarray(x, dtype) for x in args)
  shapes = [(H, D, D)] if L == 1 else [(H, 4 * D, D), (H, D, 4 * D)]
  w0 = tuple(jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1]), jnp.float32) for s in shapes)
  st = init_memory_state(w0, B)
  pert = lambda x, s: jnp.asarray(np.asarray(x) + s * rng.standard_normal(x.shape), jnp.float32)
  fs = (tuple(pert(x, 0.3) for x in st["w"]), tuple(pert(0 * x, 0.1) for x in st["w"]),
        tuple(pert(x, 0.3) for x in st["w"]))
  phase = jnp.asarray(rng.integers(0, CHUNK, B), jnp.int32)
  return args, fs, phase


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def _outputs_and_grads(a, fs, phase, lengths, cts, *, impl, interpret):
  """(o, final state) and the gradients of <(o, final w, s, w_base), cts> w.r.t. every input and
  the initial w, s, w_base."""
  kw = {"interpret": interpret} if impl.startswith("pallas") else {}

  def run(a, fs):
    st = {"w": fs[0], "s": fs[1], "w_base": fs[2], "phase": phase}
    return titans_memory(*a, state=st, chunk_size=CHUNK, lengths=lengths, implementation=impl,
                         **kw)

  def loss(a, fs):
    o, new = run(a, fs)
    leaves = jax.tree.leaves((o, (new["w"], new["s"], new["w_base"])))
    return sum(jnp.vdot(x.astype(jnp.float32), c) for x, c in zip(leaves, jax.tree.leaves(cts)))

  return run(a, fs), jax.grad(loss, argnums=(0, 1))(a, fs)


def results(impl, args, fs, phase, lengths, interpret=False):
  rng = np.random.default_rng(7)
  cts = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                     (args[0], fs))
  return _outputs_and_grads(args, fs, phase, lengths, cts, impl=impl, interpret=interpret)


def assert_results_close(got, want, tol, what):
  (o, st), (ga, gs) = got
  (o_w, st_w), (ga_w, gs_w) = want
  assert o.shape == o_w.shape and o.dtype == o_w.dtype
  assert_close(o, o_w, tol, f"{what}: o")
  np.testing.assert_array_equal(st["phase"], st_w["phase"])
  for key in ("w", "s", "w_base"):
    for l, (a, b) in enumerate(zip(st[key], st_w[key])):
      assert a.dtype == b.dtype == jnp.float32
      assert_close(a, b, tol, f"{what}: state[{key}][{l}]")
  for name, a, b in zip(ARG_NAMES, ga, ga_w):
    assert a.dtype == b.dtype
    assert_close(a, b, tol, f"{what}: d{name}")
  for key, g, g_w in zip(("w", "s", "w_base"), gs, gs_w):
    for l, (a, b) in enumerate(zip(g, g_w)):
      assert_close(a, b, tol, f"{what}: d{key}0[{l}]")


# (depth, D, T, dtype): T is not a multiple of the chunk; every case starts mid-stream (random
# phase per row, so T = 17 spans two chunks) and has one ragged row (lengths).
CASES = [
    (1, 16, 17, jnp.float32),
    (2, 16, 17, jnp.float32),
    (2, 64, 9, jnp.float32),       # E = 256, the Titans layers' expansion: both kernels run
    pytest.param(2, 16, 17, jnp.bfloat16, marks=pytest.mark.slow),  # CPU: `-m slow`; GPU: `-m gpu`
]


@pytest.mark.parametrize("impl,interpret", pallas_modes("pallas_gpu"))
@pytest.mark.parametrize("depth,D,T,dtype", CASES)
def test_pallas_matches_reference_and_xla(impl, interpret, depth, D, T, dtype):
  B, H = 2, 2
  args, fs, phase = make_case(depth * 1000 + D + T, B, T, H, D, depth, dtype)
  lengths = jnp.asarray([T, T - 6], jnp.int32)
  got = results(impl, args, fs, phase, lengths, interpret)
  if dtype == jnp.float32:  # same chunked algorithm as xla: agreement to float32 rounding
    assert_results_close(got, results("xla", args, fs, phase, lengths), 1e-5, "vs xla")
  if D < 64:  # at D = 64 xla alone (xla == reference: test_titans_memory.py); saves ~5 s of compile
    assert_results_close(got, results("reference", args, fs, phase, lengths), tol_for(dtype),
                         "vs reference")


def test_gradients_are_nonzero():
  """The parity above is not vacuous: every compared gradient of a depth-2 case is non-zero."""
  args, fs, phase = make_case(3, 2, 17, 2, 16, 2, jnp.float32)
  _, (ga, gs) = results("pallas_gpu", args, fs, phase, jnp.asarray([17, 11], jnp.int32), True)
  for name, g in list(zip(ARG_NAMES, ga)) + [(f"d{i}", g) for i, g in
                                            enumerate(jax.tree.leaves(gs))]:
    assert float(jnp.max(jnp.abs(g))) > 1e-4, name


@pytest.mark.parametrize("ops", ["kernel", "xla"])
@pytest.mark.parametrize("depth,D,E", [(1, 16, 16), (2, 16, 64)])
def test_hand_written_backward_matches_autodiff(depth, D, E, ops):
  """The hand-written VJP (`chunk_vjp.chunk_math_bwd`, over the kernel's dots here in plain JAX, or
  over the XLA path's) equals jax.vjp of the forward's `chunk_math` on one random chunk, for every
  input field (including those whose cotangents the engine only sees through the decay matrices:
  G, g_end, s_end, beta_n, f_n, mom_n)."""
  ops = pallas_gpu.KERNEL_OPS if ops == "kernel" else titans_xla.TILE_OPS
  rng = np.random.default_rng(depth)
  r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  n, shapes = 16, [(D, D)] if depth == 1 else [(E, D), (D, E)]
  tril = jnp.asarray(np.tril(np.ones((n, n))), jnp.float32)
  per_layer = lambda make: tuple(make(s) for s in shapes)
  c = chunk_vjp.ChunkIn(
      q=r(n, D) / 4, k=r(n, D) / 4, v=r(n, D), beta=r(n, 1), f=r(n, 1), beta_n=r(1, 1),
      f_n=r(1, 1), mom_n=r(1, 1), G=per_layer(lambda _: 0.3 * jnp.abs(r(n, n)) * tril),
      g_end=per_layer(lambda _: r(n, 1)), s_end=per_layer(lambda _: r(n, 1)),
      x=per_layer(lambda s: r(*s) / np.sqrt(s[1])), s=per_layer(lambda s: r(*s) / np.sqrt(s[1])),
      xb=per_layer(lambda s: r(*s) / np.sqrt(s[1])), ln_s=1 + 0.2 * r(1, D), ln_b=0.2 * r(1, D))
  forward = functools.partial(chunk_vjp.chunk_math, ops)
  cts = jax.tree.map(lambda x: r(*x.shape), jax.eval_shape(forward, c))

  @jax.jit
  def both(c, cts):
    return jax.vjp(forward, c)[1](cts)[0], chunk_vjp.chunk_cotangents(ops, c, cts)

  want, got = both(c, cts)
  for name, w, g in zip(chunk_vjp.ChunkIn._fields, want, got):
    for l, (w_l, g_l) in enumerate(zip(jax.tree.leaves(w), jax.tree.leaves(g))):
      assert g_l.shape == w_l.shape, (name, l)
      assert_close(g_l, w_l, 1e-5, f"d{name}[{l}]")


def _tiny(depth=1, T=5, D=16):
  args, fs, phase = make_case(0, 1, T, 1, D, depth, jnp.float32)
  return args, {"w": fs[0], "s": fs[1], "w_base": fs[2], "phase": phase}


@pytest.mark.parametrize("what,chunk,depth,D,match", [
    ("chunk 8", 8, 1, 16, "chunk_size"),
    ("depth 3", 16, 3, 16, "depth"),
    ("D = 24", 16, 1, 24, "D a power of two"),
    ("weights over 128 KiB", 16, 2, 128, "bytes of float32 weights"),   # E = 4 D = 512
])
def test_unsupported_raise_and_fall_back(monkeypatch, what, chunk, depth, D, match):
  """Explicit pallas_gpu raises NotImplementedError; implementation=None with the GPU preference
  order (pallas_gpu, xla) falls back to xla and gives xla's result."""
  rng = np.random.default_rng(1)
  if depth > 1:
    shapes = ((1, 4 * D, D),) + ((1, 4 * D, 4 * D),) * (depth - 2) + ((1, D, 4 * D),)
    ws = tuple(jnp.asarray(rng.standard_normal(s) / 4, jnp.float32) for s in shapes)
  else:
    ws = (jnp.asarray(rng.standard_normal((1, D, D)) / 4, jnp.float32),)
  args, _ = _tiny(1, 5, D)
  args = args[:3] + (jnp.full((1, 5, 1, depth), 0.3, jnp.float32),) + args[4:]
  st = init_memory_state(ws, 1)
  call = functools.partial(titans_memory, *args, state=st, chunk_size=chunk, interpret=True)
  with pytest.raises(NotImplementedError, match=match):
    call(implementation="pallas_gpu")
  monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_gpu", "xla"))
  o, s = call()
  o_x, s_x = call(implementation="xla")
  np.testing.assert_array_equal(o, o_x)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_x)):
    np.testing.assert_array_equal(a, b)


def test_default_dispatch_keeps_xla_until_the_kernel_is_timed(monkeypatch):
  """Even under the GPU preference order, implementation=None runs xla: the kernel is opt-in until
  a device timing shows it faster; the explicit path runs the kernel and agrees."""
  calls = []
  real = IMPLEMENTATIONS["pallas_gpu"]
  monkeypatch.setitem(IMPLEMENTATIONS, "pallas_gpu",
                      lambda *a, **kw: calls.append(kw["chunk_size"]) or real(*a, **kw))
  monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_gpu", "xla"))
  args, st = _tiny()
  o, _ = titans_memory(*args, state=st, chunk_size=16, interpret=True)
  assert calls == []
  o_k, _ = titans_memory(*args, state=st, chunk_size=16, implementation="pallas_gpu",
                         interpret=True)
  assert calls == [16]
  assert_close(o_k, o, 1e-5, "o")


def test_miras_has_no_pallas_path(monkeypatch):
  """Miras rules are not in the kernel's scope: explicit pallas_gpu fails loudly, None runs xla."""
  args, _ = _tiny()
  q, k, v, theta = args[:4]
  a = jnp.full(q.shape[:3], 0.9, jnp.float32)
  from pallas_kernels.miras_memory import init_miras_state
  st = init_miras_state((jnp.eye(16, dtype=jnp.float32)[None] * 0.5,), 1)
  call = functools.partial(miras_memory, q, k, v, theta, a, a, args[6], args[7], state=st,
                           chunk_size=16, interpret=True)
  with pytest.raises(NotImplementedError, match="pallas_gpu"):
    call(implementation="pallas_gpu")
  monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_gpu", "xla"))
  np.testing.assert_array_equal(call()[0], call(implementation="xla")[0])


def test_packed_document_resets_match_xla():
  """Resets (packed documents, on chunk starts) go through the chunk loop the kernel shares with
  xla: the kernel in interpret mode equals the xla path, starting from a mid-stream state."""
  B, T, H, D = 2, 48, 1, 16
  a, fs, _ = make_case(7, B, T, H, D, 2, jnp.float32)
  phase = jnp.asarray([0, 5], jnp.int32)
  st = {"w": fs[0], "s": fs[1], "w_base": fs[2], "phase": phase}
  fresh = init_memory_state(tuple(w[0] for w in fs[0]), B)
  # documents start where phase + t is a multiple of the chunk: t = 16, 32 (row 0); 11, 27 (row 1)
  resets = np.zeros((B, T), bool)
  resets[0, [16, 32]] = True
  resets[1, [11, 27]] = True
  outs = {impl: jax.jit(functools.partial(
      titans_memory, state=st, chunk_size=CHUNK, resets_BT=jnp.asarray(resets), reset_state=fresh,
      implementation=impl, **({"interpret": True} if impl == "pallas_gpu" else {})))(*a)
      for impl in ("xla", "pallas_gpu")}
  assert_close(outs["pallas_gpu"][0], outs["xla"][0], 1e-4, "o")
  for n in ("w", "s", "w_base"):
    for x, r in zip(outs["pallas_gpu"][1][n], outs["xla"][1][n]):
      assert_close(x, r, 1e-4, n)
