"""HCAM: the read module against a naive per-query loop (DeepMind's shapes), a single chunk equals
plain attention over the memory, masked rows and M < k, and the LM form: parallel pass equals
streaming with eviction, memory reads only earlier segments and passes no gradient, packed
documents (docs/architectures/hcam.md)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import attend
from layers.hcam import HCAM, HCAMConfig, chunk_position_encoding
from memarch.sharding import mesh_context
from pallas_kernels.testing import assert_close, rel_rms

fresh = jax.jit(lambda m, x: m(x))
step = jax.jit(lambda m, x, s: m(x, state=s))
read = jax.jit(lambda m, h, mem, valid: m.read(h, mem, valid))


def build(d=12, h=3, **kw):
  kw.setdefault("zero_init_out", False)
  with mesh_context():
    return HCAM(HCAMConfig(d_model=d, num_heads=h, **kw), rngs=nnx.Rngs(0))


def naive_read(m, h_q, mem, valid):
  """The Haiku module's read, one query at a time in float64, with the quirks fixed."""
  h_q, mem, valid = np.asarray(h_q, np.float64), np.asarray(mem, np.float64), np.asarray(valid)
  p = {n: np.asarray(getattr(m, n)[...], np.float64) for n in ("gq", "gk", "wq", "wk", "wv", "wo")}
  b_, q_, d = h_q.shape
  m_, c_ = mem.shape[1:3]
  f = p["gq"].shape[1]
  pe = np.asarray(chunk_position_encoding(c_, d), np.float64)
  k = min(m.cfg.top_k or m_, m_)
  out = np.zeros((b_, q_, d))
  for b, t in itertools.product(range(b_), range(q_)):
    qs = h_q[b, t] @ p["gq"]
    scores = np.array([qs @ (mem[b, c].mean(0) @ p["gk"]) / np.sqrt(f) for c in range(m_)])
    cand = [c for c in sorted(range(m_), key=lambda c: (-scores[c], c)) if valid[b, t, c]][:k]
    if not cand:
      continue  # no visible chunk reads 0
    w = np.exp(scores[cand] - scores[cand].max())
    w /= w.sum()
    for wc, c in zip(w, cand):
      mt = mem[b, c] + pe
      qh = np.einsum("d,dhk->hk", h_q[b, t], p["wq"])
      kh, vh = np.einsum("cd,dhk->chk", mt, p["wk"]), np.einsum("cd,dhk->chk", mt, p["wv"])
      s = np.einsum("hk,chk->hc", qh, kh) / np.sqrt(qh.shape[-1])
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out[b, t] += wc * np.einsum("hk,hkd->d", np.einsum("hc,chk->hk", a, vh), p["wo"])
  return out


@pytest.mark.parametrize("q_len", [1, 9])
def test_read_matches_naive_loop_deepmind_shapes(q_len):
  m = build(top_k=4)  # M = 7 chunks of C = 5, k = 4, 3 heads (htm_attention_test.py)
  rng = np.random.default_rng(q_len)
  h = jnp.asarray(rng.standard_normal((2, q_len, 12)), jnp.float32)
  mem = jnp.asarray(rng.standard_normal((2, 7, 5, 12)), jnp.float32)
  valid = jnp.asarray(rng.random((2, q_len, 7)) < 0.7).at[0, 0].set(False)
  out = read(m, h, mem, valid)
  assert out.shape == (2, q_len, 12)
  np.testing.assert_allclose(np.asarray(out), naive_read(m, h, mem, valid), atol=2e-5, rtol=2e-4)
  assert float(jnp.abs(out[0, 0]).max()) == 0.0, "a query with no visible chunk must read 0"
  # k = M is the dense gated formula; M < k clips k
  for k in (7, 10):
    mk = build(top_k=k)
    np.testing.assert_allclose(np.asarray(read(mk, h, mem, valid)), naive_read(mk, h, mem, valid),
                               atol=2e-5, rtol=2e-4)


def test_single_chunk_equals_attention_over_memory():
  m = build(top_k=1)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((2, 6, 12)), jnp.float32)
  mem = jnp.asarray(rng.standard_normal((2, 1, 8, 12)), jnp.float32)
  out = read(m, h, mem, jnp.ones((2, 6, 1), bool))
  mt = mem[:, 0] + chunk_position_encoding(8, 12)
  q = jnp.einsum("btd,dhk->bthk", h, m.wq[...])
  k, v = (jnp.einsum("bcd,dhk->bchk", mt, w[...]) for w in (m.wk, m.wv))
  expect = jnp.einsum("bthk,hkd->btd", attend(q, k, v, jnp.ones((2, 6, 8), bool)), m.wo[...])
  assert_close(out, expect, 1e-5, "single chunk")


def test_parallel_equals_streaming_with_eviction():
  # C = 2, S = 4, M_max = 3 chunks (older ones are evicted), k = 2 of them
  m = build(chunk_size=2, segment_len=4, max_chunks=3, top_k=2)
  t = 27
  x = jax.random.normal(jax.random.PRNGKey(0), (2, t, 12))
  full, full_state = step(m, x, m.init_state(2, max_len=t))
  none_y, _ = fresh(m, x)
  assert rel_rms(none_y, full) < 1e-6
  for cuts in ([1, 2, 3], [5, 14]):
    state, outs, prev = m.init_state(2, max_len=t), [], 0
    for c in cuts + [t]:
      y, state = step(m, x[:, prev:c], state)
      outs.append(y)
      prev = c
    assert rel_rms(jnp.concatenate(outs, 1), full) < 2e-5, cuts
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(full_state)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_memory_part_is_read_of_earlier_segments():
  """y - Attn_local = read(h, visible chunks of earlier segments); nothing of the current one."""
  m = build(chunk_size=2, segment_len=4, max_chunks=3, top_k=2)
  t = 16  # segments 0..3; the last segment sees chunks 3, 4, 5 (chunks 0-2 are evicted)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, t, 12))
  y, _ = fresh(m, x)
  local = jax.jit(lambda m, x: m.local(x, segment_ids_BT=jnp.arange(t)[None].repeat(2, 0) // 4))
  mem_part = y - local(m, x)[0]
  chunks = x.reshape(2, 8, 2, 12)
  expect = read(m, x[:, 12:], chunks[:, 3:6], jnp.ones((2, 4, 3), bool))
  assert_close(mem_part[:, 12:], expect, 1e-5, "last segment")
  # (the local part is recomputed in another jit: rounding only)
  assert float(jnp.abs(mem_part[:, :4]).max()) < 1e-6, "segment 0 has no memory"
  assert float(jnp.abs(mem_part[:, 4:]).max()) > 1e-2
  # perturbing the current segment leaves the memory part of its outputs unchanged
  x2 = x.at[:, 12].add(5.0)
  mem2 = fresh(m, x2)[0] - local(m, x2)[0]
  np.testing.assert_allclose(np.asarray(mem2[:, 13:]), np.asarray(mem_part[:, 13:]), atol=1e-5)


def test_no_gradient_into_memory():
  m = build(chunk_size=2, segment_len=4, top_k=2)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 12))
  f = lambda x: fresh(m, x)[0][0, 5:].sum()  # outputs of segment 1
  g = jax.grad(f)(x)
  assert float(jnp.abs(g[0, :4]).max()) == 0.0, "the memory (segment 0) must get no gradient"
  assert float(jnp.abs(g[0, 4:6]).max()) > 0
  assert float(jnp.abs(f(x.at[0, 1].add(3.0)) - f(x))) > 1e-4, "yet segment 1 reads segment 0"


def test_zero_init_output():
  m = build(chunk_size=2, segment_len=4, zero_init_out=True)
  assert float(jnp.abs(m.wo[...]).max()) == 0.0


# Packed rows: cuts that are multiples of no chunk or segment length, a one-token document, other
# cuts per row; C = 4, S = 8, M_max = 3 (eviction inside the long documents), k = 2.
PACK_T, PACK_CUTS = 30, ([5, 11, 29], [2, 3, 17])
PACK_CFG = dict(chunk_size=4, segment_len=8, max_chunks=3, top_k=2)
packed = jax.jit(lambda m, x, seg: m(x, segment_ids_BT=seg))
packed_step = jax.jit(lambda m, x, s, seg: m(x, state=s, segment_ids_BT=seg))


def packed_ids(cuts, t):
  return jnp.asarray([[sum(i >= c for c in row) for i in range(t)] for row in cuts], jnp.int32)


def alone_outputs(m, x, cuts):
  """Each document of each row run alone with state=None: every document is moved to the start of
  its own row (zeros after it, which causality hides) and all run in one batch, one compile."""
  t = x.shape[1]
  docs = [(b, a, e) for b, row in enumerate(cuts) for a, e in zip([0, *row], [*row, t])]
  rows = jnp.stack([jnp.pad(x[b, a:], ((0, a), (0, 0))) for b, a, _ in docs])
  y = fresh(m, rows)[0]
  return jnp.stack([jnp.concatenate([y[i, :e - a] for i, (bb, a, e) in enumerate(docs) if bb == b])
                    for b in range(x.shape[0])])


def test_packed_documents_equal_documents_alone():
  m = build(**PACK_CFG)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, PACK_T, 12))
  seg = packed_ids(PACK_CUTS, PACK_T)
  y, _ = packed(m, x, seg)
  assert rel_rms(y, alone_outputs(m, x, PACK_CUTS)) < 2e-4
  unpacked, _ = fresh(m, x)
  assert rel_rms(y[:, 12:], unpacked[:, 12:]) > 1e-2, "documents must not see each other"
  g = jax.jit(jax.grad(lambda x, m: jnp.sum(jnp.sin(m(x, segment_ids_BT=seg)[0]))))(x, m)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_packed_documents_continue_a_state():
  """The first document continues the state, later ones start fresh; the returned state is the
  last document's alone (outputs and every state leaf, the local attention's included)."""
  m = build(**PACK_CFG)
  x, p, cap = jax.random.normal(jax.random.PRNGKey(4), (2, PACK_T, 12)), 6, 48
  _, state = step(m, x[:, :p], m.init_state(2, max_len=cap))
  y, new_state = packed_step(m, x[:, p:], state, packed_ids(PACK_CUTS, PACK_T)[:, p:])
  for b, row in enumerate(PACK_CUTS):
    bounds = [p, *[c for c in row if c > p], PACK_T]
    s, outs = jax.tree.map(lambda a: a[b:b + 1], state), []
    for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
      yy, s = step(m, x[b:b + 1, a:e], s if i == 0 else m.init_state(1, max_len=cap))
      outs.append(yy)
    assert rel_rms(y[b:b + 1], jnp.concatenate(outs, axis=1)) < 2e-4, b
    for name, leaf in new_state.items():
      np.testing.assert_allclose(np.asarray(leaf[b:b + 1]), np.asarray(s[name]), rtol=1e-5,
                                 atol=1e-5, err_msg=name)
