"""Landmark attention: grouped softmax vs a float64 per-query brute force, top-k = all blocks vs the
training form, split invariance with a small k, packed documents, landmark insertion
(docs/architectures/landmark.md)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.landmark import IGNORE, LandmarkAttention, LandmarkConfig, insert_landmarks
from memarch.sharding import mesh_context
from pallas_kernels.testing import rel_rms

D, H, B = 16, 2, 2


def build(**kw):
  with mesh_context():
    return LandmarkAttention(LandmarkConfig(d_model=D, num_heads=H, **kw), rngs=nnx.Rngs(0))


def inputs(seed, t, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, t, D), jnp.float32).astype(dtype)


# Eager first calls compile every primitive separately (seconds each on a busy CPU): always jit.
step = jax.jit(lambda m, x, s: m(x, state=s))
fresh = jax.jit(lambda m, x: m(x))


def run_pieces(m, x, cuts, max_len=None):
  t = x.shape[1]
  state = m.init_state(B, max_len=max_len or t, dtype=x.dtype)
  outs, prev = [], 0
  for c in list(cuts) + [t]:
    y, state = step(m, x[:, prev:c], state)
    outs.append(y)
    prev = c
  return jnp.concatenate(outs, axis=1), state


def rope64(x_D, pos, base=10000.0):
  """layers/rotary.apply_rope for one vector, in float64."""
  half = x_D.shape[-1] // 2
  ang = pos * base ** (-np.arange(half) / half)
  x1, x2 = x_D[:half], x_D[half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)])


def brute_force(m, x, block, key_pos=None):
  """Section 1.2 literally, per query and head, in float64: Z_i sums the own-block content keys
  j <= i and the landmarks of all past blocks; a past block's content shares its landmark's mass.
  key_pos(i, j): the RoPE position key j takes against query i (query i sits at i), applied here
  to the layer's unrotated q and k; None: the layer's own qkv positions."""
  t = x.shape[1]
  q, k, v = (np.asarray(a, np.float64) for a in m.qkv(x, jnp.arange(t)[None].repeat(B, 0)))
  d = q.shape[-1]
  ell = block - 1
  o = np.zeros(q.shape)
  for b, i, h in itertools.product(range(B), range(t), range(H)):
    c = i // block
    if key_pos is None:
      s = lambda j: q[b, i, h] @ k[b, j, h] / np.sqrt(d)
    else:
      qi = rope64(q[b, i, h], i)
      s = lambda j: qi @ rope64(k[b, j, h], key_pos(i, j)) / np.sqrt(d)
    own = [j for j in range(c * block, i + 1) if j % block != ell]
    past = range(c)
    z = sum(np.exp(s(j)) for j in own) + sum(np.exp(s(bb * block + ell)) for bb in past)
    a = np.zeros(t)
    for j in own:
      a[j] = np.exp(s(j)) / z
    for bb in past:
      js = range(bb * block, bb * block + ell)
      inner = np.array([np.exp(s(j)) for j in js])
      a[list(js)] = np.exp(s(bb * block + ell)) / z * inner / inner.sum()
    assert abs(a.sum() - 1) < 1e-12 and all(a[j] == 0 for j in range(ell, t, block))
    o[b, i, h] = a @ v[b, :, h]
  return np.einsum("bthk,hkd->btd", o, np.asarray(m.wo[...], np.float64))


@pytest.mark.parametrize("positions", ["exact", "none"])
def test_grouped_softmax_matches_brute_force(x64, positions):
  block, t = 4, 14  # three complete blocks and a trailing block without its landmark
  m = build(block_size=block, top_k=None, positions=positions)
  x = inputs(0, t, jnp.float64)
  ref = brute_force(m, x, block)
  y, _ = fresh(m, x)
  assert y.dtype == jnp.float64
  # RoPE computes its rotation in float32 (layers/rotary.py), whose sin/cos may round differently
  # in and out of jit: exact positions get a float32-level tolerance, 'none' the float64 one.
  tol = 1e-9 if positions == "none" else 2e-5
  np.testing.assert_allclose(np.asarray(y), ref, rtol=tol, atol=tol)
  # a history prefix (the second piece starts mid-block) and a one-token step
  y2, _ = run_pieces(m, x, [5, 6])
  np.testing.assert_allclose(np.asarray(y2), ref, rtol=tol, atol=tol)


def test_stingy_positions_match_float64_mapping(x64):
  """positions='stingy': own block and the W recent blocks at their stream positions, every older
  block (content and landmark) at the positions of the block just before the recent window. A
  wrong slot, or exact positions, misses the float64 computation by far more than the RoPE's
  float32 rounding; queries with no older block agree with exact positions."""
  block, w, t = 4, 1, 30  # 7 complete blocks: queries in blocks 2-7 read older blocks
  m = build(block_size=block, top_k=None, recent_blocks=w, positions="stingy")

  def key_pos(i, j):
    c, bb = i // block, j // block
    return j if bb >= c - w else (c - w - 1) * block + j % block

  x = inputs(7, t, jnp.float64)
  ref = brute_force(m, x, block, key_pos)
  y, _ = fresh(m, x)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
  y2, _ = run_pieces(m, x, [5, 6, 17])  # the cache holds unrotated keys: pieces agree
  np.testing.assert_allclose(np.asarray(y2), ref, rtol=2e-5, atol=2e-5)
  exact, _ = fresh(build(block_size=block, top_k=None, recent_blocks=w), x)
  no_far = (w + 1) * block  # queries in blocks 0..W read no older block
  np.testing.assert_allclose(np.asarray(exact[:, :no_far]), ref[:, :no_far], rtol=2e-5, atol=2e-5)
  assert np.abs(np.asarray(exact[:, no_far:]) - ref[:, no_far:]).max() > 1e-2


def test_stingy_is_split_invariant_causal_and_packs():
  """Conformance for positions='stingy' with retrieval (top_k=1): one call == pieces == token by
  token (outputs and state), causal, packed documents == documents alone."""
  block, t = 4, 30
  m = build(block_size=block, top_k=1, recent_blocks=1, positions="stingy")
  x = inputs(8, t)
  full, full_state = step(m, x, m.init_state(B, max_len=t))
  none_y, _ = fresh(m, x)
  assert rel_rms(none_y, full) < 1e-6
  for cuts in ([9], range(1, t)):
    y, state = run_pieces(m, x, cuts)
    assert rel_rms(y, full) < 2e-5, cuts
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(full_state)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  j = 13
  y1, _ = fresh(m, x.at[:, j].add(3.0))
  np.testing.assert_allclose(none_y[:, :j], y1[:, :j], atol=1e-5)
  assert float(jnp.abs(none_y[:, j:] - y1[:, j:]).max()) > 1e-3
  xp = x[:, :PACK_T]
  yp, _ = packed(m, xp, packed_ids(PACK_CUTS, PACK_T))
  assert rel_rms(yp, alone_outputs(m, xp, PACK_CUTS)) < 2e-4


def test_topk_covering_all_blocks_equals_training_form():
  block, t = 4, 22
  x = inputs(1, t)
  train = build(block_size=block, top_k=None)
  full, _ = fresh(train, x)
  for kw in (dict(top_k=6, recent_blocks=0, share="token"), dict(top_k=2, recent_blocks=3)):
    stream = build(block_size=block, **kw)
    y, _ = run_pieces(stream, x, range(1, t))  # token by token
    assert rel_rms(y, full) < 2e-5, kw


def test_small_k_is_split_invariant_and_retrieves():
  block, t = 4, 30
  x = inputs(2, t)
  m = build(block_size=block, top_k=1, recent_blocks=1)
  full, full_state = step(m, x, m.init_state(B, max_len=t))
  none_y, _ = fresh(m, x)
  assert rel_rms(none_y, full) < 1e-6
  for cuts in ([1, 2, 3], [9]):
    y, state = run_pieces(m, x, cuts)
    assert rel_rms(y, full) < 2e-5, cuts
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(full_state)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  dense, _ = fresh(build(block_size=block, top_k=None), x)
  early = block * 3  # queries in blocks 0-2 see at most W + k = 2 past blocks: identical
  assert rel_rms(full[:, :early], dense[:, :early]) < 1e-6
  assert rel_rms(full[:, early:], dense[:, early:]) > 1e-3, "top_k=1 should drop blocks"


def test_causality_with_retrieval():
  m = build(block_size=4, top_k=1, recent_blocks=1)
  x = inputs(3, 23)
  j = 13
  y0, _ = fresh(m, x)
  y1, _ = fresh(m, x.at[:, j].add(3.0))
  np.testing.assert_allclose(y0[:, :j], y1[:, :j], atol=1e-5)
  assert float(jnp.abs(y0[:, j:] - y1[:, j:]).max()) > 1e-3


def test_bfloat16_and_grads():
  m = build(block_size=4, top_k=2, recent_blocks=1)
  x = inputs(4, 21)
  y16, _ = fresh(m, x.astype(jnp.bfloat16))
  y32, _ = fresh(m, x)
  assert y16.dtype == jnp.bfloat16 and rel_rms(y16.astype(jnp.float32), y32) < 3e-2
  g = jax.jit(jax.grad(lambda x, m: jnp.sum(jnp.sin(m(x)[0]))))(x, m)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


# Packed rows: cuts that are multiples of no block size, a one-token document, other cuts per row.
PACK_T, PACK_CUTS = 30, ([5, 11, 29], [2, 3, 17])


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


packed = jax.jit(lambda m, x, seg: m(x, segment_ids_BT=seg))
packed_step = jax.jit(lambda m, x, s, seg: m(x, state=s, segment_ids_BT=seg))


def test_packed_documents_equal_documents_alone():
  m = build(block_size=4, top_k=1, recent_blocks=1)  # long documents retrieve older blocks
  x = inputs(5, PACK_T)
  seg = packed_ids(PACK_CUTS, PACK_T)
  y, _ = packed(m, x, seg)
  assert rel_rms(y, alone_outputs(m, x, PACK_CUTS)) < 2e-4
  unpacked, _ = fresh(m, x)
  assert rel_rms(y[:, 12:], unpacked[:, 12:]) > 1e-2, "documents must not see each other"
  g = jax.jit(jax.grad(lambda x, m: jnp.sum(jnp.sin(m(x, segment_ids_BT=seg)[0]))))(x, m)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


def test_packed_documents_continue_a_state():
  """The first document continues the state, later ones start fresh; the returned state is the
  last document's alone (outputs and every state leaf)."""
  m = build(block_size=4, top_k=1, recent_blocks=1)
  x, p, cap = inputs(6, PACK_T), 6, 48
  _, state = step(m, x[:, :p], m.init_state(B, max_len=cap))
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


def test_insert_landmarks():
  inp = np.arange(1, 8)[None].repeat(2, 0).astype(np.int32)
  tgt = np.arange(2, 9)[None].repeat(2, 0).astype(np.int32)
  tgt[1, 2] = IGNORE
  x, y = insert_landmarks(inp, tgt, block_size=4, landmark_id=99)
  np.testing.assert_array_equal(x[0], [1, 2, 3, 99, 4, 5, 6, 99, 7])
  np.testing.assert_array_equal(y[0], [2, 3, 4, IGNORE, 5, 6, 7, IGNORE, 8])
  np.testing.assert_array_equal(y[1], [2, 3, IGNORE, IGNORE, 5, 6, 7, IGNORE, 8])
  xj, yj = insert_landmarks(jnp.asarray(inp), jnp.asarray(tgt), block_size=4, landmark_id=99)
  np.testing.assert_array_equal(np.asarray(xj), x)
  np.testing.assert_array_equal(np.asarray(yj), y)
  # every landmark lands where the layer expects it: p mod L = L - 1
  assert set(np.flatnonzero(x[0] == 99) % 4) == {3}
