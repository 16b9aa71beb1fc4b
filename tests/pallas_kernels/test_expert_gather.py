"""expert_gather / expert_mlp: the custom-VJP `xla` path equals autodiff of the naive take + einsum
(docs/architectures/peer.md) and never materialises a [T, K, D] tensor; the Pallas
kernels match the reference in interpret mode and lower for CUDA (Triton) and TPU (Mosaic)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels.expert_gather import expert_gather, expert_mlp
from pallas_kernels.expert_gather.bench import bench_expert_gather
from pallas_kernels.testing import (
  assert_close,
  assert_tree_close,
  grads_of,
  on_device,
  random_normal,
)

N, E, F, T, K = 23, 6, 5, 11, 4


def enable_x64():
  return jax.enable_x64(True)


def _indices(kind, key, t=T, k=K, n=N):
  if kind == "random":
    return jax.random.randint(key, (t, k), 0, n)
  if kind == "one_row":  # every entry on a single row: the worst duplication
    return jnp.full((t, k), 7, jnp.int32)
  if kind == "ends":  # first and last rows only
    return jnp.where(jax.random.bernoulli(key, 0.5, (t, k)), 0, n - 1).astype(jnp.int32)
  if kind == "dup":  # heavy duplication over 3 rows
    return jax.random.randint(key, (t, k), 0, 3)
  raise ValueError(kind)


@pytest.mark.parametrize("kind,chunk", [("random", 3), ("random", 10_000), ("one_row", 8),
                                        ("ends", 3), ("dup", 8)])
def test_gather_matches_naive_autodiff_f64(kind, chunk):
  with enable_x64():
    table, w = random_normal(jax.random.PRNGKey(0), [(N, F), (T, K)], jnp.float64)
    idx = _indices(kind, jax.random.PRNGKey(1))
    fx = lambda t, w: expert_gather(t, idx, w, chunk_size=chunk, implementation="xla")
    fr = lambda t, w: expert_gather(t, idx, w, implementation="reference")
    assert_close(fx(table, w), fr(table, w), 1e-12, "y")
    assert_tree_close(grads_of(fx, (table, w), (0, 1)), grads_of(fr, (table, w), (0, 1)), 1e-12,
                      "grads")


@pytest.mark.parametrize("kind,chunk,activation", [
    ("random", 3, "gelu"), ("random", 10_000, "gelu"), ("random", 8, "identity"),
    ("one_row", 8, "gelu"), ("ends", 3, "gelu"), ("dup", 8, "relu")])
def test_mlp_matches_naive_autodiff_f64(kind, chunk, activation):
  with enable_x64():
    x, down, up, w = random_normal(jax.random.PRNGKey(2), [(T, E), (N, E), (N, F), (T, K)],
                                   jnp.float64)
    idx = _indices(kind, jax.random.PRNGKey(3))
    fx = lambda *a: expert_mlp(*a[:3], idx, a[3], activation=activation, chunk_size=chunk,
                               implementation="xla")
    fr = lambda *a: expert_mlp(*a[:3], idx, a[3], activation=activation, implementation="reference")
    args = (x, down, up, w)
    assert_close(fx(*args), fr(*args), 1e-12, "y")
    assert_tree_close(grads_of(fx, args, (0, 1, 2, 3)), grads_of(fr, args, (0, 1, 2, 3)), 1e-12,
                      "grads (x, down, up, w)")


def test_f32_parity_and_bf16_activations_with_f32_tables():
  x, down, up, w = random_normal(jax.random.PRNGKey(4), [(T, E), (N, E), (N, F), (T, K)])
  idx = _indices("random", jax.random.PRNGKey(5))
  args = (x, down, up, w)
  fx = lambda *a: expert_mlp(*a[:3], idx, a[3], chunk_size=8, implementation="xla")
  fr = lambda *a: expert_mlp(*a[:3], idx, a[3], implementation="reference")
  assert_close(fx(*args), fr(*args), 1e-5, "f32 y")
  assert_tree_close(jax.jit(lambda *a: grads_of(fx, a, range(4)))(*args),
                    grads_of(fr, args, range(4)), 1e-5, "f32 grads")
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  yb = fx(xb, down, up, wb)
  assert yb.dtype == jnp.bfloat16
  assert_close(yb, fr(x, down, up, w), 2e-2, "bf16 y")
  gb = jax.jit(lambda *a: grads_of(fx, a, range(4)))(xb, down, up, wb)
  assert [g.dtype for g in gb] == [jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16]
  assert_tree_close(tuple(g.astype(jnp.float32) for g in gb), grads_of(fr, args, range(4)), 3e-2,
                    "bf16 grads")


def test_leading_dims_and_default_dispatch():
  table, w = random_normal(jax.random.PRNGKey(6), [(N, F), (2, 3, K)])
  idx = jax.random.randint(jax.random.PRNGKey(7), (2, 3, K), 0, N)
  y = expert_gather(table, idx, w)
  assert y.shape == (2, 3, F)
  want = np.einsum("abk,abkf->abf", np.asarray(w), np.asarray(table)[np.asarray(idx)])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):
    expert_mlp(w, table, table, idx, w, activation="tanh")


def test_check_grads_tiny():
  with enable_x64():
    x, down, up, w = random_normal(jax.random.PRNGKey(8), [(3, 4), (5, 4), (5, 2), (3, 2)],
                                   jnp.float64)
    idx = jnp.array([[0, 4], [4, 4], [2, 0]])
    f = lambda *a: expert_mlp(*a[:3], idx, a[3], chunk_size=2, implementation="xla")
    check_grads(f, (x, down, up, w), order=1, modes=["rev"])
    g = lambda t, w: expert_gather(t, idx, w, chunk_size=2, implementation="xla")
    check_grads(g, (up, w), order=1, modes=["rev"])


def _float_intermediate_sizes(jaxpr):
  """Sizes of every floating-point value produced anywhere in a (closed) jaxpr, sub-jaxprs included."""
  sizes = []

  def visit(j):
    for eqn in j.eqns:
      for v in eqn.outvars:
        aval = v.aval
        if hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.floating):
          sizes.append(int(np.prod(aval.shape)))
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if hasattr(sub, "eqns"):
            visit(sub)
          elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
            visit(sub.jaxpr)

  visit(jaxpr.jaxpr)
  return sizes


@pytest.mark.parametrize("op", ["gather", "mlp"])
def test_backward_has_no_dense_TKD_intermediate(op):
  t, k, d, n, chunk = 64, 8, 16, 40, 64
  x, down, up, w = random_normal(jax.random.PRNGKey(9), [(t, d), (n, d), (n, d), (t, k)])
  idx = jax.random.randint(jax.random.PRNGKey(10), (t, k), 0, n)

  def loss(impl):
    if op == "gather":
      return lambda x, down, up, w: jnp.sum(expert_gather(up, idx, w, chunk_size=chunk,
                                                          implementation=impl) ** 2)
    return lambda x, down, up, w: jnp.sum(expert_mlp(x, down, up, idx, w, chunk_size=chunk,
                                                     implementation=impl) ** 2)

  dense = t * k * d
  naive = _float_intermediate_sizes(jax.make_jaxpr(jax.grad(loss("reference"), (0, 1, 2, 3)))(
      x, down, up, w))
  assert max(naive) >= dense  # the probe sees the naive path's [T, K, D] rows
  fused = _float_intermediate_sizes(jax.make_jaxpr(jax.grad(loss("xla"), (0, 1, 2, 3)))(
      x, down, up, w))
  assert max(fused) <= max(chunk * d, n * d, t * d) < dense


def test_bench_runs_and_custom_vjp_uses_less_memory():
  r = bench_expert_gather(n_experts=1024, d=32, T=256, k=32, iters=1, warmup=1)
  for path in ("naive", "custom_vjp"):
    assert r[path]["step_s"] > 0 and r[path]["bytes"] > 0
  assert r["custom_vjp"]["temp_bytes"] < r["naive"]["temp_bytes"]


# ----------------------------------------------------------------------------- Pallas kernels

PALLAS = ("pallas_gpu", "pallas_tpu")


def _out_and_grads(fn, args, argnums):
  """(fn(*args), grads of <fn, random cotangent> w.r.t. args[argnums]) from one jitted vjp."""
  def both(a):
    def f(*d):
      full = list(a)
      for i, x in zip(argnums, d):
        full[i] = x
      return fn(*full)
    out, vjp = jax.vjp(f, *[a[i] for i in argnums])
    ct = jax.random.normal(jax.random.PRNGKey(0), out.shape, jnp.float32).astype(out.dtype)
    return out, vjp(ct)
  return jax.jit(both)(args)


@pytest.mark.parametrize("impl,op,kind,activation,interpret", [
    ("pallas_gpu", "mlp", "random", "gelu", True), ("pallas_gpu", "gather", "one_row", None, True),
    ("pallas_tpu", "mlp", "one_row", "silu", True), ("pallas_tpu", "gather", "dup", None, True),
    on_device("pallas_gpu", "mlp", "random", "gelu", False),
    on_device("pallas_gpu", "gather", "dup", None, False)])
def test_pallas_interpret_matches_reference(monkeypatch, impl, op, kind, activation, interpret):
  """Outputs and every gradient (x, tables, weights) in float32: widths that are not powers of two
  (6, 20), N = 23 rows over several row blocks, all 44 entries on one row (one_row: several CSR
  steps for one block), and (GPU) the segment sum split over two column programs."""
  from pallas_kernels.expert_gather import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "COL_BLOCK", 16)
  f_dim = 20
  x, down, up, w = random_normal(jax.random.PRNGKey(11), [(T, E), (N, E), (N, f_dim), (T, K)])
  idx = _indices(kind, jax.random.PRNGKey(12))
  if op == "mlp":
    f = lambda impl_: lambda *a: expert_mlp(*a[:3], idx, a[3], activation=activation,
                                           implementation=impl_, interpret=interpret)
    args, argnums = (x, down, up, w), (0, 1, 2, 3)
  else:
    f = lambda impl_: lambda t, w: expert_gather(t, idx, w, implementation=impl_,
                                                 interpret=interpret)
    args, argnums = (up, w), (0, 1)
  y, grads = _out_and_grads(f(impl), args, argnums)
  y_ref, grads_ref = _out_and_grads(f("reference"), args, argnums)
  assert_close(y, y_ref, 1e-5, "y")
  assert_tree_close(grads, grads_ref, 1e-5, "grads")


def test_pallas_gpu_bf16_activations_with_f32_tables():
  """bf16 activations with float32 tables keep the xla path's dtypes and accuracy."""
  x, down, up, w = random_normal(jax.random.PRNGKey(13), [(T, E), (N, E), (N, F), (T, K)])
  idx = _indices("random", jax.random.PRNGKey(14))
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  fp = lambda *a: expert_mlp(*a[:3], idx, a[3], implementation="pallas_gpu", interpret=True)
  fr = lambda *a: expert_mlp(*a[:3], idx, a[3], implementation="reference")
  y, gp = _out_and_grads(fp, (xb, down, up, wb), range(4))
  y_ref, g_ref = _out_and_grads(fr, (x, down, up, w), range(4))
  assert y.dtype == jnp.bfloat16
  assert [g.dtype for g in gp] == [jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16]
  assert_close(y, y_ref, 2e-2, "bf16 y")
  assert_tree_close(tuple(g.astype(jnp.float32) for g in gp), g_ref, 3e-2, "bf16 grads")


def test_pallas_unsupported_inputs_fall_back(monkeypatch):
  """float64 raises NotImplementedError on the Pallas paths; with a GPU-like preference order,
  implementation=None falls back to xla for it and runs the kernel otherwise."""
  from pallas_kernels import _dispatch
  with enable_x64():
    table, w = random_normal(jax.random.PRNGKey(15), [(N, F), (T, K)], jnp.float64)
    idx = _indices("random", jax.random.PRNGKey(16))
    for impl in PALLAS:
      with pytest.raises(NotImplementedError, match="float32"):
        expert_gather(table, idx, w, implementation=impl, interpret=True)
    monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_gpu", "xla"))
    run = jax.jit(lambda t, w: expert_gather(t, idx, w, interpret=True))
    y = run(table, w)
    assert y.dtype == jnp.float64
    assert_close(y, expert_gather(table, idx, w, implementation="reference"), 1e-12, "fallback")
    t32, w32 = table.astype(jnp.float32), w.astype(jnp.float32)
    assert "pallas_call" in str(jax.make_jaxpr(run)(t32, w32))
    assert "pallas_call" not in str(jax.make_jaxpr(run)(table, w))
    y32 = run(t32, w32)
    assert y32.dtype == jnp.float32
    assert_close(y32, expert_gather(table, idx, w, implementation="reference"), 1e-6, "kernel")
