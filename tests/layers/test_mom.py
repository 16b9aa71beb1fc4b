"""MoM: reduction to Gated DeltaNet, the balance loss, nothing dropped by routing, packed documents
equal to documents run alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.deltanet import GatedDeltaNet, GatedDeltaNetConfig
from layers.mom import MoM, MoMConfig, balance_loss
from memarch.sharding import mesh_context

D, H = 16, 2


def test_one_memory_top1_no_shared_equals_gated_deltanet():
  with mesh_context():
    mom = MoM(MoMConfig(D, H, num_memories=1, top_k=1, shared_memory=False, chunk_size=4),
              rngs=nnx.Rngs(0))
    gdn = GatedDeltaNet(GatedDeltaNetConfig(D, H, chunk_size=4), rngs=nnx.Rngs(1))
  # Copy MoM's weights into the GDN layer.
  gdn.wq[...] = mom.wq[...]
  gdn.wk[...] = mom.wk[...][0]
  gdn.wv[...] = mom.wv[...][0]
  gdn.wb[...] = mom.wb[...][0]
  gdn.wa[...] = mom.wa[...][0]
  for name in ("A_log", "dt_bias"):
    getattr(gdn, name)[...] = getattr(mom, name)[...]
  for name in ("conv_q", "conv_k", "conv_v"):
    getattr(gdn, name).weight[...] = getattr(mom, name).weight[...]
  for name in ("w_gate", "scale", "wo"):
    getattr(gdn.out, name)[...] = getattr(mom.out, name)[...]
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, D))
  y_mom, s_mom = mom(x)
  y_gdn, s_gdn = gdn(x)
  np.testing.assert_allclose(y_mom, y_gdn, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_mom["S"][:, 0], s_gdn["S"], rtol=1e-5, atol=1e-6)


def test_balance_loss_is_k_when_uniform_and_larger_when_skewed():
  m, k, n = 4, 2, 8
  probs = jnp.full((n, m), 1 / m)
  idx = jnp.array([[(i + j) % m for j in range(k)] for i in range(n)])
  assert float(balance_loss(probs, idx, m)) == k
  skew_p = jnp.tile(jnp.array([[0.7, 0.2, 0.05, 0.05]]), (n, 1))
  skew_i = jnp.tile(jnp.array([[0, 1]]), (n, 1))
  assert float(balance_loss(skew_p, skew_i, m)) > 3.0


def test_every_routed_token_is_processed():
  """Even when all tokens pick the same memories (worst imbalance) none are dropped: zeroing every
  memory's value projection except one changes the output at every position."""
  with mesh_context():
    mom = MoM(MoMConfig(D, H, num_memories=4, top_k=1, shared_memory=False, chunk_size=4),
              rngs=nnx.Rngs(0))
  mom.router[...] = jnp.zeros_like(mom.router[...]).at[:, 2].set(0.0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, D))
  probs = jax.nn.softmax(x @ mom.router[...], -1)
  assert np.allclose(probs, 0.25)  # ties: top-1 is memory 0 for every token
  y0, _ = mom(x)
  mom.wv[...] = mom.wv[...].at[0].set(0.0)
  y1, _ = mom(x)
  diff = np.abs(np.asarray(y0 - y1)).max(-1)
  assert np.all(diff > 1e-6), diff


# Packed documents. T = 19 with chunk_size 8: no cut is a multiple of the chunk, each row has a
# one-token document, the rows cut differently (row 1 reuses id 0 for its last document), and every
# document length appears in both rows so the separate runs compile few shapes.
T_PACK = 19
CUTS = ([5, 11, 12], [6, 7, 12])
SEG = jnp.array([[0] * 5 + [1] * 6 + [2] * 1 + [3] * 7,
                 [0] * 6 + [1] * 1 + [2] * 5 + [0] * 7], jnp.int32)
# With a carried state: a one-token first document skips top_k of the memories, whose carried state
# must not reach the later documents that select them.
CUTS_STATE = ([1, 7, 13], [1, 9, 10])
SEG_STATE = jnp.array([[4] * 1 + [5] * 6 + [6] * 6 + [7] * 6,
                       [0] * 1 + [1] * 8 + [2] * 1 + [3] * 9], jnp.int32)


def _packed_mom(dtype=jnp.float32, **kw):
  cfg = dict(num_memories=4, top_k=2, shared_memory=True, chunk_size=8, conv_size=4)
  cfg.update(kw)
  with mesh_context():
    m = MoM(MoMConfig(D, H, **cfg), rngs=nnx.Rngs(3))
  # A sharper router than the init's, so routing differs from token to token.
  m.router[...] = 2.0 * jax.random.normal(jax.random.PRNGKey(7), m.router[...].shape)
  if dtype != jnp.float32:
    nnx.update(m, jax.tree.map(lambda p: p.astype(dtype), nnx.state(m)))
  return m


@jax.jit
def _apply(m, x, state, seg):
  return m(x, state=state, segment_ids_BT=seg)


def _row_state(state, r):
  return jax.tree.map(lambda a: a[r:r + 1], state)


def _separate(m, x, all_cuts=CUTS, state=None):
  """Each document of each row run alone: the first from `state` (row r), the others fresh.
  Returns the concatenated outputs [B, T, D] and the last document's state (batch B)."""
  ys, finals = [], []
  for r, cuts in enumerate(all_cuts):
    bounds = [0] + cuts + [T_PACK]
    row = []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
      s0 = _row_state(state, r) if (state is not None and i == 0) else None
      y, st = _apply(m, x[r:r + 1, s:e], s0, None)
      row.append(y)
    ys.append(jnp.concatenate(row, axis=1))
    finals.append(st)
  return (jnp.concatenate(ys, axis=0),
          jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *finals))


def _rel_rms(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30))


def _assert_tree_rel(a, b, tol):
  for (path, la), lb in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert la.shape == lb.shape, path
    err = _rel_rms(la, lb) if np.any(np.asarray(lb)) else float(np.abs(np.asarray(la)).max())
    assert err < tol, (jax.tree_util.keystr(path), err)


def _skipped_memories(m, x, all_cuts=CUTS):
  """(row, document, memory) triples where a document never selects a routed memory that another
  document of the row selects: the case where a stale state could leak."""
  probs = jax.nn.softmax(x.astype(jnp.float32) @ m.router[...].astype(jnp.float32), -1)
  sel = np.asarray(jax.nn.one_hot(jax.lax.top_k(probs, m.cfg.top_k)[1], m.cfg.num_memories).sum(2))
  out = []
  for r, cuts in enumerate(all_cuts):
    bounds = [0] + cuts + [T_PACK]
    used = sel[r].any(0)
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
      out += [(r, i, j) for j in np.flatnonzero(used & ~sel[r, s:e].any(0))]
  return out


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-4), (jnp.float64, 1e-10)])
def test_packed_row_equals_documents_run_separately(request, dtype, tol):
  if dtype == jnp.float64:
    request.getfixturevalue("x64")
  m = _packed_mom(dtype)
  x = jax.random.normal(jax.random.PRNGKey(11), (2, T_PACK, D)).astype(dtype)
  assert _skipped_memories(m, x), "the test needs a memory that some document skips"
  y, state = _apply(m, x, None, SEG)
  assert y.dtype == dtype
  y_ref, state_ref = _separate(m, x)
  assert _rel_rms(y, y_ref) < tol
  # The returned state (every memory's S and conv tails, routed and shared) is the last
  # document's own, including memories the last document never selects (fresh state).
  _assert_tree_rel(state, state_ref, tol)


def test_packed_with_state_continues_first_document_only():
  m = _packed_mom()
  x0 = jax.random.normal(jax.random.PRNGKey(12), (2, 6, D))
  x = jax.random.normal(jax.random.PRNGKey(13), (2, T_PACK, D))
  _, state0 = _apply(m, x0, None, None)
  assert any(i == 0 for _, i, _ in _skipped_memories(m, x, CUTS_STATE))
  y, state = _apply(m, x, state0, SEG_STATE)
  y_ref, state_ref = _separate(m, x, CUTS_STATE, state0)
  assert _rel_rms(y, y_ref) < 2e-4
  _assert_tree_rel(state, state_ref, 2e-4)
  # One document per row with a state: the same as no segment ids.
  same = jnp.full((2, T_PACK), 5, jnp.int32)
  y1, s1 = _apply(m, x, state0, same)
  y2, s2 = _apply(m, x, state0, None)
  assert _rel_rms(y1, y2) < 1e-6
  _assert_tree_rel(s1, s2, 1e-6)


def test_packed_reset_covers_conv_tails():
  """Short documents (shorter than the conv's K-1 = 3 taps) after long ones: the outputs do not
  depend on earlier documents at all, and the returned tails hold zeros before the last document."""
  m = _packed_mom(shared_memory=True)
  seg = jnp.array([[0] * 17 + [1] * 2, [0] * 18 + [1]], jnp.int32)
  x = jax.random.normal(jax.random.PRNGKey(14), (2, T_PACK, D))
  _, state0 = _apply(m, jax.random.normal(jax.random.PRNGKey(15), (2, 5, D)), None, None)
  y, state = _apply(m, x, state0, seg)
  # Change every token and the carried state before the last document: nothing after it moves.
  x2 = x.at[:, :17].set(jax.random.normal(jax.random.PRNGKey(16), (2, 17, D)))
  y2, state2 = _apply(m, x2, None, seg)
  np.testing.assert_allclose(y[0, 17:], y2[0, 17:], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y[1, 18:], y2[1, 18:], rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Tails: [B, M, K-1, C] routed, [B, K-1, C] shared. Row 1's last document has one token, so at
  # most its last slot is non-zero; row 0's has two.
  for name in ("q", "k", "v"):
    np.testing.assert_array_equal(np.asarray(state["conv"][name][1, :, :2]), 0.0)
    np.testing.assert_array_equal(np.asarray(state["conv"][name][0, :, :1]), 0.0)
    np.testing.assert_array_equal(np.asarray(state["shared_conv"][name][1, :2]), 0.0)
    np.testing.assert_array_equal(np.asarray(state["shared_conv"][name][0, :1]), 0.0)
    assert np.any(np.asarray(state["shared_conv"][name][:, -1]))


def test_packed_gradients_are_finite():
  m = _packed_mom()
  x = jax.random.normal(jax.random.PRNGKey(17), (2, T_PACK, D))

  def loss(m, x):
    y, _ = m(x, segment_ids_BT=SEG)
    return jnp.mean(y ** 2)

  g_m, g_x = jax.jit(nnx.grad(loss, argnums=(0, 1)))(m, x)
  leaves = jax.tree.leaves(nnx.state(g_m, nnx.Param)) + [g_x]
  assert all(np.all(np.isfinite(np.asarray(a))) for a in leaves)
  assert np.any(np.asarray(g_x)) and np.any(np.asarray(g_m.wk[...]))
