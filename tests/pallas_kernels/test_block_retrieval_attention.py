"""block_retrieval_attention: reference and xla against a float64 per-query brute force
(docs/architectures/landmark.md); the Pallas kernels (training and decode
forwards, backward) against the reference in interpret mode. Lowering checks: test_lowering.py."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention import attend
from pallas_kernels.block_retrieval_attention import block_retrieval_attention
from pallas_kernels.testing import assert_close, grads_of, on_device, pallas_modes, rel_rms

IMPLS = ("reference", "xla")


def make(seed, *, B=2, T=7, H=2, d=4, N=5, C=3, S=6, G=2, local=True, pad=False, dtype=np.float64):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, H, d))
  bk = rng.standard_normal((B, N, C, H, d))
  bv = rng.standard_normal((B, N, C, H, d))
  gate = 2.0 * rng.standard_normal((B, T, G, N))
  allowed = rng.random((B, T, N)) < 0.7
  allowed[0, 0] = False  # an empty row when there is no local part
  always = (rng.random((B, T, N)) < 0.2) & ~allowed
  always[0, 0] = False
  blk_mask = rng.random((B, N, C)) < 0.7 if pad else None
  if pad:
    blk_mask[:, :, 0] = True
    blk_mask[1, 2] = False  # a block with no valid key
  loc = None
  if local:
    kl, vl = rng.standard_normal((B, S, H, d)), rng.standard_normal((B, S, H, d))
    ml = rng.random((B, T, S)) < 0.5
    ml[0, 0] = False
    loc = (kl, vl, ml)
  cast = lambda a: None if a is None else (jnp.asarray(a, dtype) if a.dtype != bool else jnp.asarray(a))
  local_j = None if loc is None else tuple(cast(a) for a in loc)
  return (cast(q), cast(bk), cast(bv), cast(gate), cast(allowed)), dict(
      always=cast(always), local=local_j, blk_mask=cast(blk_mask))


def brute_force(args, *, always, local, blk_mask, k, share, far=None):
  """Per query and head: pick S_i, then a_ij = exp(g_b)/Z * softmax_b(s)_j, local exp(s_ij)/Z;
  with far=(q_far, blk_k_far) a block outside `always` is scored with those instead."""
  q, bk, bv, gate, allowed = (np.asarray(a, np.float64) for a in args)
  allowed = allowed.astype(bool)
  B, T, H, d = q.shape
  N, C = bk.shape[1:3]
  G = gate.shape[2]
  always = np.zeros_like(allowed) if always is None else np.asarray(always)
  valid = np.ones((B, N, C), bool) if blk_mask is None else np.asarray(blk_mask)
  o = np.zeros(q.shape)
  for b, t, h in itertools.product(range(B), range(T), range(H)):
    cand = [n for n in range(N) if allowed[b, t, n]]
    g = gate[b, t, h if G > 1 else 0]
    if k is not None and cand:
      if share == "token" and G > 1:
        probs = [np.exp(gate[b, t, hh, cand] - gate[b, t, hh, cand].max()) for hh in range(G)]
        probs = [p / p.sum() for p in probs]
        score = {n: max(p[i] for p in probs) for i, n in enumerate(cand)}
      else:
        score = {n: g[n] for n in cand}
      cand = sorted(cand, key=lambda n: (-score[n], n))[:k]
    sel = sorted(set(cand) | {n for n in range(N) if always[b, t, n]})
    terms = []  # (log weight before normalisation, value)
    for n in sel:
      js = [j for j in range(C) if valid[b, n, j]]
      if not js:
        continue
      qq, kk = (q, bk) if far is None or always[b, t, n] else (np.asarray(a) for a in far)
      s = np.array([qq[b, t, h] @ kk[b, n, j, h] for j in js]) / np.sqrt(d)
      inner = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
      terms.append((g[n], inner @ bv[b, n, js, h]))
    if local is not None:
      kl, vl, ml = (np.asarray(a) for a in local)
      for j in range(kl.shape[1]):
        if ml[b, t, j]:
          terms.append((q[b, t, h] @ kl[b, j, h] / np.sqrt(d), vl[b, j, h]))
    if terms:
      logw = np.array([w for w, _ in terms])
      a = np.exp(logw - logw.max())
      a /= a.sum()
      o[b, t, h] = sum(ai * v for ai, (_, v) in zip(a, terms))
  return o


CASES = [  # (k, share, local, pad, G)
    (None, "token_head", True, False, 2),
    (2, "token_head", True, False, 2),
    (1, "token", True, True, 2),
    (2, "token", False, False, 2),
    (3, "token_head", False, True, 1),
    (7, "token_head", True, False, 1),  # k > N
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k,share,local,pad,G", CASES)
def test_matches_brute_force(x64, impl, k, share, local, pad, G):
  args, kw = make(0, local=local, pad=pad, G=G)
  out = jax.jit(lambda a, kw: block_retrieval_attention(
      *a, k=k, share=share, implementation=impl, chunk_size=3, **kw))(args, kw)
  ref = brute_force(args, k=k, share=share, **kw)
  assert out.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-9, atol=1e-11)
  if not local:
    assert float(jnp.abs(out[0, 0]).max()) == 0.0, "a row with nothing visible must give 0"


@pytest.mark.parametrize("k,share,local,pad,G", CASES[:4])
def test_xla_gradients_match_reference(x64, k, share, local, pad, G):
  args, kw = make(1, local=local, pad=pad, G=G)
  loc = kw.pop("local")

  def fn(impl):
    def f(q, bk, bv, gate, kl, vl):
      lo = None if loc is None else (kl, vl, loc[2])
      return block_retrieval_attention(q, bk, bv, gate, args[4], k=k, share=share, local=lo,
                                       implementation=impl, chunk_size=3, **kw)
    return f

  kl, vl = (loc[0], loc[1]) if loc is not None else (jnp.zeros(()), jnp.zeros(()))
  inputs = list(args[:4]) + [kl, vl]
  argnums = (0, 1, 2, 3, 4, 5) if loc is not None else (0, 1, 2, 3)
  g_ref = jax.jit(lambda a: grads_of(fn("reference"), a, argnums))(inputs)
  g_xla = jax.jit(lambda a: grads_of(fn("xla"), a, argnums))(inputs)
  for name, a, b in zip(("dq", "dblk_k", "dblk_v", "dgate", "dk_loc", "dv_loc"), g_xla, g_ref):
    assert float(jnp.abs(b).max()) > 0, name
    assert_close(a, b, 1e-9, name)


def far_inputs(args, seed=5):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(a.shape), a.dtype) for a in (args[0], args[1]))


@pytest.mark.parametrize("k,share", [(2, "token_head"), (1, "token")])
def test_far_scores_match_brute_force_values_and_gradients(x64, k, share):
  """far=(q_far, blk_k_far) scores the non-always blocks (values: reference and xla against the
  brute force; gradients: xla == reference, reaching q_far and blk_k_far)."""
  args, kw = make(2, pad=True)
  far = far_inputs(args)
  ref = brute_force(args, k=k, share=share, far=far, **kw)
  assert np.abs(ref - brute_force(args, k=k, share=share, **kw)).max() > 1e-2
  for impl in IMPLS:
    out = jax.jit(lambda a, f, kw: block_retrieval_attention(
        *a, k=k, share=share, implementation=impl, chunk_size=3, far=f, **kw))(args, far, kw)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-9, atol=1e-11, err_msg=impl)

  def fn(impl):
    def f(q, bk, bv, gate, qf, kf):
      return block_retrieval_attention(q, bk, bv, gate, args[4], k=k, share=share, far=(qf, kf),
                                       implementation=impl, chunk_size=3, **kw)
    return f

  inputs = list(args[:4]) + list(far)
  g_ref = jax.jit(lambda a: grads_of(fn("reference"), a, tuple(range(6))))(inputs)
  g_xla = jax.jit(lambda a: grads_of(fn("xla"), a, tuple(range(6))))(inputs)
  for name, a, b in zip(("dq", "dblk_k", "dblk_v", "dgate", "dq_far", "dblk_k_far"), g_xla, g_ref):
    assert float(jnp.abs(b).max()) > 0, name
    assert_close(a, b, 1e-9, name)


def test_far_falls_back_from_pallas(monkeypatch):
  """The Pallas kernels refuse far= in one line; implementation=None then runs xla."""
  from pallas_kernels import _dispatch
  args, kw = make(3, B=1, T=3, N=3, dtype=np.float32)
  far = far_inputs(args)
  for impl in ("pallas_gpu", "pallas_tpu"):
    with pytest.raises(NotImplementedError, match="far=") as err:
      block_retrieval_attention(*args, k=2, implementation=impl, interpret=True, far=far, **kw)
    assert "\n" not in str(err.value)
  monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_gpu", "xla"))
  out = block_retrieval_attention(*args, k=2, interpret=True, far=far, **kw)
  want = block_retrieval_attention(*args, k=2, implementation="xla", far=far, **kw)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-4), (jnp.bfloat16, 2e-2)])
def test_low_precision_against_float64(x64, dtype, tol):
  args, kw = make(2, T=9, pad=True)
  cast = lambda a: a.astype(dtype) if a.dtype == jnp.float64 else a
  args_lp = [cast(a) for a in args]
  kw_lp = dict(kw, local=tuple(cast(a) for a in kw["local"]))
  # the selection must be that of the low-precision gate, so compute the oracle from it
  ref = brute_force([a.astype(jnp.float64) if a.dtype == dtype else a for a in args_lp],
                    k=2, share="token_head",
                    **dict(kw_lp, local=tuple(a.astype(jnp.float64) if a.dtype == dtype else a
                                              for a in kw_lp["local"])))
  for impl in IMPLS:
    f = lambda q: block_retrieval_attention(q, *args_lp[1:], k=2, implementation=impl,
                                            chunk_size=4, **kw_lp)
    out, g = jax.jit(lambda q: (f(q), jax.grad(lambda q: jnp.sum(f(q).astype(jnp.float32)))(q)))(
        args_lp[0])
    assert out.dtype == dtype
    assert rel_rms(out.astype(jnp.float32), ref) < tol, impl
    assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_sum_to_one_and_empty_rows_are_zero(impl):
  args, kw = make(3, pad=True, dtype=np.float32)
  q, bk, bv, gate, allowed = args
  loc = kw["local"]
  ones_v = jnp.ones_like(bv)
  kw = dict(kw, local=(loc[0], jnp.ones_like(loc[1]), loc[2]))
  out = jax.jit(lambda kw: block_retrieval_attention(q, bk, ones_v, gate, allowed, k=2,
                                                     implementation=impl, chunk_size=4, **kw))(kw)
  any_visible = (jnp.any(allowed | kw["always"], -1) | jnp.any(loc[2], -1))
  # the only possibly empty row is [0, 0]: nothing allowed, no local key
  assert not bool(any_visible[0, 0])
  expect = jnp.where(any_visible[..., None, None], 1.0, 0.0)
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(expect, out.shape), atol=1e-5)


def test_k1_selects_argmax_gate():
  args, kw = make(4, local=False, G=2, dtype=np.float32)
  q, bk, bv, gate, allowed = args
  allowed = jnp.ones_like(allowed)
  out = block_retrieval_attention(q, bk, bv, gate, allowed, k=1)
  best = jnp.argmax(gate, axis=-1)  # [B, T, H]
  b_idx = jnp.arange(q.shape[0])[:, None, None]
  h_idx = jnp.arange(q.shape[2])[None, None, :]
  k_sel = bk[b_idx, best, :, h_idx]  # [B, T, H, C, d]
  v_sel = bv[b_idx, best, :, h_idx]
  s = jnp.einsum("bthd,bthcd->bthc", q, k_sel) / 2.0
  expect = jnp.einsum("bthc,bthcd->bthd", jax.nn.softmax(s, -1), v_sel)
  assert_close(out, expect, 1e-5, "k=1")


def test_single_chunk_k1_is_plain_attention():
  """HCAM check: one chunk, k = 1, no local part: ordinary attention over the chunk, any gate."""
  args, _ = make(5, N=1, C=6, local=False, dtype=np.float32)
  q, bk, bv, gate, _ = args
  allowed = jnp.ones(gate.shape[:2] + (1,), bool)
  out = block_retrieval_attention(q, bk, bv, gate[:, :, :1], allowed, k=1)
  mask = jnp.ones((q.shape[0], q.shape[1], bk.shape[2]), bool)
  expect = attend(q, bk[:, 0], bv[:, 0], mask)
  assert_close(out, expect, 1e-5, "single chunk")


def test_unsupported_share_mode_fails_loudly():
  args, kw = make(0, dtype=np.float32)
  with pytest.raises(NotImplementedError, match="share"):
    block_retrieval_attention(*args, k=2, share="tile", **kw)


# ----------------------------------------------------------------------------- Pallas kernels

def _pallas(impl):
  from pallas_kernels.block_retrieval_attention import pallas_gpu, pallas_tpu
  return {"pallas_gpu": pallas_gpu.block_retrieval_attention_pallas_gpu,
          "pallas_tpu": pallas_tpu.block_retrieval_attention_pallas_tpu}[impl]


def _out_and_grads(fn, inputs, argnums):
  """(fn(*inputs), grads of <fn, random cotangent> w.r.t. inputs[argnums]) in one jitted vjp."""
  def both(a):
    diff = [a[i] for i in argnums]
    def f(*d):
      full = list(a)
      for i, x in zip(argnums, d):
        full[i] = x
      return fn(*full)
    out, vjp = jax.vjp(f, *diff)
    return out, vjp(jax.random.normal(jax.random.PRNGKey(0), out.shape, out.dtype))
  return jax.jit(both)(inputs)


@pytest.mark.parametrize("impl,decode,case,interpret", [
    ("pallas_gpu", False, 1, True), ("pallas_gpu", True, 2, True), ("pallas_gpu", False, 4, True),
    ("pallas_tpu", False, 2, True), ("pallas_tpu", True, 4, True),
    on_device("pallas_gpu", False, 1, False),
    on_device("pallas_gpu", True, 2, False),
    on_device("pallas_gpu", False, 4, False)])
def test_pallas_interpret_matches_reference(impl, decode, case, interpret):
  """Training and decode forwards plus every gradient (q, blocks, gate, local keys/values), float32,
  over top-k / 'token' sharing / padded blocks / no local part (the CASES above)."""
  k, share, local, pad, G = CASES[case]
  args, kw = make(1, local=local, pad=pad, G=G, dtype=np.float32)
  loc = kw.pop("local")

  def fn(impl_):
    def f(q, bk, bv, gate, kl, vl):
      lo = None if loc is None else (kl, vl, loc[2])
      if impl_ == "reference":
        return block_retrieval_attention(q, bk, bv, gate, args[4], k=k, share=share, local=lo,
                                         implementation="reference", **kw)
      return _pallas(impl_)(q, bk, bv, gate, args[4], k=k, share=share, local=lo, decode=decode,
                            interpret=interpret, **kw)
    return f

  kl, vl = (loc[0], loc[1]) if loc is not None else (jnp.zeros(()), jnp.zeros(()))
  inputs = list(args[:4]) + [kl, vl]
  argnums = (0, 1, 2, 3, 4, 5) if loc is not None else (0, 1, 2, 3)
  out, grads = _out_and_grads(fn(impl), inputs, argnums)
  out_ref, grads_ref = _out_and_grads(fn("reference"), inputs, argnums)
  assert out.dtype == jnp.float32
  assert_close(out, out_ref, 1e-5, "o")
  if not local:
    assert float(jnp.abs(out[0, 0]).max()) == 0.0, "a row with nothing visible must give 0"
  for name, a, b in zip(("dq", "dblk_k", "dblk_v", "dgate", "dk_loc", "dv_loc"), grads, grads_ref):
    assert float(jnp.abs(b).max()) > 0, name
    assert_close(a, b, 1e-5, name)


def _landmark_inputs(seed, T=40, L=8, H=2, d=8):
  """Landmark training form (Mohtashami & Jaggi 2023, Eq. 1-4): blocks of L-1 content keys gated by
  the landmark score, every complete past block allowed (k=None), the own block as the causal local
  part."""
  rng = np.random.default_rng(seed)
  nb = -(-T // L)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  q, kk, vv = f(1, T, H, d), f(1, nb * L, H, d), f(1, nb * L, H, d)
  blk = lambda a: a.reshape(1, nb, L, H, d)[:, :, :L - 1]
  lmk = kk.reshape(1, nb, L, H, d)[:, :, L - 1]
  gate = jnp.einsum("bthd,bnhd->bthn", q, lmk) * d ** -0.5
  pos = jnp.arange(T)
  allowed = (jnp.arange(nb)[None, :] < (pos // L)[:, None])[None]
  kpos = jnp.arange(nb * L)
  own = ((kpos[None] // L == pos[:, None] // L) & (kpos[None] <= pos[:, None])
         & (kpos[None] % L != L - 1))[None]
  return q, blk(kk), blk(vv), gate, allowed, (kk, vv, own)


@pytest.mark.parametrize("impl,interpret", pallas_modes("pallas_gpu", "pallas_tpu"))
def test_pallas_landmark_training_form_skips_unread_tiles(monkeypatch, impl, interpret):
  """Several query tiles and local key tiles, most of them skipped (causal blocks, block-diagonal
  own-block mask): still equal to the reference. Future blocks hold NaN, which a kernel that read
  a tile no query of it selects would spread into the output."""
  from pallas_kernels.block_retrieval_attention import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "LOCAL_TILE", 16)
  q, bk, bv, gate, allowed, local = _landmark_inputs(2)
  poison = jnp.arange(bk.shape[1])[None, :, None, None, None] >= 4   # first read at t = 40 > 32
  bk_nan, bv_nan = jnp.where(poison, jnp.nan, bk), jnp.where(poison, jnp.nan, bv)
  run = jax.jit(lambda q, bk, bv, g, al, loc: _pallas(impl)(q, bk, bv, g, al, k=None, local=loc,
                                                            chunk_size=16, interpret=interpret))
  t = 32
  out = run(q[:, :t], bk_nan, bv_nan, gate[:, :t], allowed[:, :t],
            (local[0], local[1], local[2][:, :t]))
  ref = jax.jit(lambda q, bk, bv, g, al, loc: block_retrieval_attention(
      q, bk, bv, g, al, k=None, local=loc, implementation="reference"))(
          q[:, :t], bk, bv, gate[:, :t], allowed[:, :t], (local[0], local[1], local[2][:, :t]))
  assert_close(out, ref, 1e-5, "landmark form")


@pytest.mark.parametrize("impl,interpret", pallas_modes("pallas_gpu", "pallas_tpu"))
def test_pallas_decode_reads_only_selected_blocks(impl, interpret):
  """The decode kernels walk each row's selection list: blocks outside every row's top-k may hold
  NaN without effect, and the result equals the reference with those blocks zeroed."""
  args, kw = make(3, B=1, T=3, N=6, local=True, dtype=np.float32)
  q, bk, bv, gate, allowed = args
  gate = gate.at[..., 5].set(-50.0)               # block 5: never in any top-2
  kw = dict(kw, always=None)
  run = jax.jit(lambda q, bk, bv, kw: _pallas(impl)(q, bk, bv, gate, allowed, k=2, decode=True,
                                                    interpret=interpret, **kw))
  out = run(q, bk.at[:, 5].set(jnp.nan), bv.at[:, 5].set(jnp.nan), kw)
  ref = jax.jit(lambda q, bk, bv, kw: block_retrieval_attention(
      q, bk, bv, gate, allowed, k=2, implementation="reference", **kw))(
          q, bk.at[:, 5].set(0.0), bv.at[:, 5].set(0.0), kw)
  assert_close(out, ref, 1e-5, "decode")


def test_pallas_unsupported_inputs_fall_back(x64, monkeypatch):
  """float64 raises NotImplementedError on the Pallas paths; under a GPU-like preference order,
  implementation=None falls back to xla."""
  from pallas_kernels import _dispatch
  args, kw = make(0, B=1, T=3, N=3)
  for impl in ("pallas_gpu", "pallas_tpu"):
    with pytest.raises(NotImplementedError, match="float32"):
      block_retrieval_attention(*args, k=2, implementation=impl, interpret=True, **kw)
  monkeypatch.setattr(_dispatch, "default_order", lambda backend=None: ("pallas_gpu", "xla"))
  run = jax.jit(lambda a, kw: block_retrieval_attention(*a, k=2, interpret=True, **kw))
  assert "pallas_call" not in str(jax.make_jaxpr(run)(args, kw))
  out = run(args, kw)
  np.testing.assert_allclose(np.asarray(out), brute_force(args, k=2, share="token_head", **kw),
                             rtol=1e-9, atol=1e-11)
